"""Build plots/vendor/dvc_plots.html: dvc's plot page with vega, vega-lite and vega-embed inlined.

    python plots/build_template.py            # once per install (npm must reach its registry)
    dvc plots show --html-template plots/vendor/dvc_plots.html

Why: dvc's default page loads vega from a CDN, so offline (this machine, CI) every chart is
blank. The three npm packages are fetched with `npm pack` at the versions dvc-render 1.0.2 itself
names, checked against the sha512 pinned below, and their minified builds (~0.8 MB together)
are inlined into plots/template.html. The result is gitignored: the repo keeps only the pins.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKER = "<!-- vega: plots/build_template.py inlines vega, vega-lite and vega-embed here -->"

# package@version -> (npm integrity, file inside the tarball). Same versions as dvc-render's CDN
# tags, so the offline page draws exactly what `dvc plots show` draws online.
PACKAGES = {
    "vega@5.20.2": (
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "package/build/vega.min.js"),
    "vega-lite@5.2.0": (
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "package/build/vega-lite.min.js"),
    "vega-embed@6.18.2": (
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "package/build/vega-embed.min.js"),
}


def integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch(spec: str, dest: Path) -> str:
    """npm pack one package into dest, check its sha512, return the minified build's text."""
    want, member = PACKAGES[spec]
    try:
        out = subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(dest), spec],
                             capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("npm not found: install Node.js/npm (Debian: apt-get install -y npm), then rerun")
    except subprocess.CalledProcessError as e:
        sys.exit(f"npm pack {spec} failed (is the npm registry reachable?):\n{e.stderr}")
    tgz = dest / out.strip().splitlines()[-1]
    got = integrity(tgz)
    if got != want:
        sys.exit(f"{spec}: sha512 mismatch: got {got}, pinned {want}; refusing to use it")
    with tarfile.open(tgz) as tar:
        js = tar.extractfile(member).read().decode("utf-8")
    # An inline <script> ends at the first "</script"; the pinned builds contain none.
    if "</script" in js.lower():
        sys.exit(f"{spec}/{member} contains '</script' and cannot be inlined")
    return js


def build(out: Path) -> Path:
    template = (HERE / "template.html").read_text(encoding="utf-8")
    if MARKER not in template:
        sys.exit(f"{HERE / 'template.html'} lost its marker line {MARKER!r}")
    with tempfile.TemporaryDirectory() as tmp:
        scripts = "\n".join(f"<script>/* {spec} */\n{fetch(spec, Path(tmp))}\n</script>"
                            for spec in PACKAGES)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.parent.name == "vendor" and not (out.parent / ".gitignore").exists():
        (out.parent / ".gitignore").write_text("*\n", encoding="utf-8")  # built, never committed
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(template.replace(MARKER, scripts), encoding="utf-8")
    os.replace(tmp_out, out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default=str(HERE / "vendor" / "dvc_plots.html"),
                   help="where to write the page template (default: plots/vendor/dvc_plots.html)")
    out = build(Path(p.parse_args(argv).out))
    print(f"{out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
