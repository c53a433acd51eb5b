"""Markdown of what moved between a base run and HEAD: `dvc metrics diff` and `dvc params diff`.

    python -m lorapipe.report int4-qlora-phase1a       # an archive name: reads archive/NAME/rev
    python -m lorapipe.report main                     # or any git revision
    python -m lorapipe.report "$BASE" --plots report   # + `dvc plots diff` as report/plots.png
    make report BASE=int4-qlora-phase1a

Writes the markdown to stdout; the tables are exactly what `dvc metrics diff <rev> HEAD --md`
and `dvc params diff <rev> HEAD --md` print, with the base given as its full commit hash, so
an archive compares the same in a clone that has no tags. The PR workflow
(.github/workflows/metrics.yml) posts this same output as one updatable comment.

--plots renders `dvc plots diff` offline through plots/vendor/dvc_plots.html (built by
`python plots/build_template.py`) and screenshots it with headless Chromium.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lorapipe.archive import ARCHIVE_DIR, ArchiveError, git, repo_root

TEMPLATE = Path("plots") / "vendor" / "dvc_plots.html"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium flags for a screenshot that touches no network and no profile of the user's.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                "--virtual-time-budget=10000"]
WIDTH = 1200  # px: two 300 px charts with their legends a row (plots/template.html)


class ReportError(RuntimeError):
    """The report cannot be made as asked; the message says why and how to fix it."""


def resolve_base(root: Path, base: str) -> tuple[str, str]:
    """An archive name or a git revision -> (full commit hash, where it came from)."""
    rev_file = root / ARCHIVE_DIR / base / "rev"
    if re.fullmatch(r"[A-Za-z0-9._-]+", base) and rev_file.is_file():
        rev = rev_file.read_text(encoding="utf-8").strip()
        if not re.fullmatch(r"[0-9a-f]{40}", rev):
            raise ReportError(f"{rev_file} holds {rev!r}, not a full 40-hex commit hash")
        where = f"{ARCHIVE_DIR}/{base}/rev"
    else:
        rev, where = base, "git revision"
    r = subprocess.run(["git", "rev-parse", "--verify", "-q", f"{rev}^{{commit}}"], cwd=root,
                       capture_output=True, text=True)
    if r.returncode != 0:
        if where != "git revision":
            raise ReportError(f"{where} names commit {rev}, which this clone lacks: fetch the "
                               "full history (git fetch --unshallow, or fetch-depth: 0 in CI)")
        raise ReportError(f"BASE {base!r} is neither an archive (no {ARCHIVE_DIR}/{base}/rev) nor "
                           "a git revision here: see `ls archive/` and `git log --oneline`")
    return r.stdout.strip(), where


def dvc(root: Path, *args: str) -> str:
    """Run this interpreter's dvc (the venv's, whatever PATH says) and return its stdout."""
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise ReportError(f"dvc {' '.join(args)} failed:\n{(r.stderr or r.stdout).strip()}")
    if r.stderr.strip():
        print(r.stderr.strip(), file=sys.stderr)  # dvc's warnings stay visible, off the report
    return r.stdout.strip()


def sorted_rows(table: str) -> str:
    """dvc loads metrics files in parallel, so its row order varies run to run: sort the rows
    (by path, then key) under the header so a PR comment only changes when a number does."""
    lines = table.splitlines()
    return "\n".join(lines[:2] + sorted(lines[2:]))


def tables(root: Path, rev: str, show_all: bool) -> tuple[str, str]:
    extra = ["--all"] if show_all else []
    metrics = dvc(root, "metrics", "diff", rev, "HEAD", "--md", *extra)
    params = dvc(root, "params", "diff", rev, "HEAD", "--md", *extra)
    return sorted_rows(metrics), sorted_rows(params)


def rows(table: str) -> int:
    """Data rows of a dvc --md table (dvc prints a bare header when nothing differs)."""
    return max(0, sum(line.startswith("|") for line in table.splitlines()) - 2)


def find_browser() -> str:
    for name in ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []) + list(BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    raise ReportError("no Chromium for the plot screenshot: install it (Debian: apt-get "
                       "install -y chromium) or set CHROMIUM=/path/to/chrome")


def screenshot(html: Path, png: Path, height: int) -> Path:
    """Headless Chromium shot of html, cropped to the drawn area (white margins dropped)."""
    from PIL import Image, ImageChops

    profile = png.parent / ".chromium-profile"  # a throwaway profile, never the user's
    cmd = [find_browser(), *CHROME_FLAGS, f"--user-data-dir={profile}",
           f"--screenshot={png}", f"--window-size={WIDTH},{height}", html.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    if r.returncode != 0 or not png.is_file():
        raise ReportError(f"chromium screenshot failed ({r.returncode}):\n{r.stderr[-2000:]}")
    img = Image.open(png).convert("RGB")
    box = ImageChops.difference(img, Image.new("RGB", img.size, "white")).getbbox()
    if box is None:
        raise ReportError(f"{png} is blank: the plots did not render (open {html} to see why)")
    img.crop((0, 0, img.width, min(img.height, box[3] + 16))).save(png)
    return png


def plots(root: Path, rev: str, out: Path) -> Path:
    """`dvc plots diff rev HEAD` as out/index.html (offline template) and out/plots.png."""
    template = root / TEMPLATE
    if not template.is_file():
        raise ReportError(f"{template} is missing: run `python plots/build_template.py` once "
                           "(it inlines vega from npm so the page renders offline)")
    out = out if out.is_absolute() else Path.cwd() / out
    dvc(root, "plots", "diff", rev, "HEAD", "--html-template", str(template), "-o", str(out))
    html = out / "index.html"
    charts = html.read_text(encoding="utf-8").count("vegaEmbed(")
    if charts == 0:
        raise ReportError("dvc plots diff drew no chart: does dvc.yaml define `plots`?")
    # Room for one chart a row (a long rev name in the legend can push the second chart down),
    # ~560 px each with the bench facets: 5 charts -> 3,000 px; the crop trims what is unused.
    height = min(16000, 200 + 560 * charts)
    return screenshot(html, out / "plots.png", height)


def report(base: str, show_all: bool = False, plots_dir: str | None = None,
           cwd: Path | None = None) -> str:
    root = repo_root(cwd)
    rev, where = resolve_base(root, base)
    head = git(root, "rev-parse", "HEAD").strip()
    if rev == head:  # dvc's diff of a commit with itself misaligns its --all columns (3.67.1)
        raise ReportError(f"BASE {base!r} is HEAD itself ({head}): nothing to compare; name an "
                          "earlier commit or an archive")
    metrics, params = tables(root, rev, show_all)
    origin = f"`{base}` = `{rev}` ({where})" if base != rev else f"`{rev}`"
    lines = [f"## Metrics: {base} → HEAD", "",
             f"Base {origin}; HEAD `{head}`.", "",
             metrics if rows(metrics) else "_No metric changed._", "",
             "## Params", "", params if rows(params) else "_No param changed._", ""]
    if plots_dir is not None:
        png = plots(root, rev, Path(plots_dir))
        shown = os.path.relpath(png, Path.cwd())
        lines += ["## Plots", "", f"![dvc plots diff {base} HEAD]({shown})", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("base", help="an archive name (archive/NAME/rev) or any git revision")
    p.add_argument("--all", action="store_true", help="list unchanged metrics and params too")
    p.add_argument("--plots", metavar="DIR",
                   help="also render `dvc plots diff` into DIR (index.html, plots.png)")
    args = p.parse_args(argv)
    try:
        sys.stdout.write(report(args.base, args.all, args.plots))
    except (ArchiveError, ReportError) as e:
        sys.exit(f"report: {e}")


if __name__ == "__main__":
    main()
