"""Archive a committed run: archive/NAME/ keeps its README, params, lock, metrics and commit hash.

    python -m lorapipe.archive int4-qlora-phase1a --reason "merged INT4 model drifts from ..."
    git add archive/int4-qlora-phase1a && git commit -m "Archive run int4-qlora-phase1a"
    dvc metrics diff $(cat archive/int4-qlora-phase1a/rev) HEAD --md   # later, from any clone

The run is the HEAD commit: its params.yaml, dvc.lock and metrics/ are read from that commit
(not from the working tree) and `rev` records its full hash. HEAD is also tagged
`archive/NAME`, but nothing depends on the tag (tags do not travel with every clone; the
recorded commit does, as long as it stays in main's history). Refuses when the working tree's
params.yaml, dvc.lock or metrics/ differ from HEAD (the run is not committed), when HEAD's
metrics are not the ones its dvc.lock recorded, and when the folder or the tag already exist.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lorapipe import files

ARCHIVE_DIR = "archive"
RUN_FILES = ("params.yaml", "dvc.lock")   # plus every file under metrics/
METRICS_DIR = "metrics"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ArchiveError(RuntimeError):
    """The run cannot be archived as asked; the message says why and how to fix it."""


def git(root: Path, *args: str, binary: bool = False):
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=not binary)
    if r.returncode != 0:
        err = r.stderr if not binary else r.stderr.decode(errors="replace")
        raise ArchiveError(f"git {' '.join(args)} failed in {root}:\n{err.strip()}")
    return r.stdout


def repo_root(cwd: Path | None = None) -> Path:
    cwd = Path(cwd or Path.cwd())
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ArchiveError(f"{cwd} is not inside a git repository; run this in the project clone")
    return Path(r.stdout.strip())


def check_name(root: Path, name: str) -> None:
    """NAME becomes a folder and a tag: plain characters only, and neither may exist yet."""
    if not NAME_RE.match(name) or name.endswith((".lock", ".")) or ".." in name:
        raise ArchiveError(f"archive name {name!r} is not usable as a folder and tag name: use "
                           "letters, digits, '.', '_' and '-' (for example int4-qlora-phase1a)")
    folder = root / ARCHIVE_DIR / name
    in_head = subprocess.run(["git", "cat-file", "-e", f"HEAD:{ARCHIVE_DIR}/{name}"], cwd=root,
                             capture_output=True).returncode == 0
    if folder.exists() or in_head:
        raise ArchiveError(f"{folder} already exists: an archive is never overwritten; pick "
                           "another name (or delete the folder and its commit on purpose)")
    tag = f"refs/tags/{ARCHIVE_DIR}/{name}"
    if subprocess.run(["git", "rev-parse", "-q", "--verify", tag], cwd=root,
                      capture_output=True).returncode == 0:
        raise ArchiveError(f"tag {ARCHIVE_DIR}/{name} already exists: an archive is never "
                           f"overwritten; pick another name (or `git tag -d {ARCHIVE_DIR}/{name}` "
                           "if that tag is a leftover)")


def check_committed(root: Path) -> None:
    """The run must be HEAD: no change to its params, lock or metrics in the working tree."""
    status = git(root, "status", "--porcelain=v1", "--untracked-files=all", "--",
                 *RUN_FILES, METRICS_DIR).splitlines()
    if status:
        listed = "\n  ".join(status)
        raise ArchiveError(
            "the run is not committed: these differ from HEAD (git status):\n  " + listed +
            "\nThe archive records HEAD's hash as the run, so commit the run first:\n"
            f"  git add {' '.join(RUN_FILES)} {METRICS_DIR} && git commit -m 'Run <what it was>'\n"
            "then archive again (or `git restore` those files if HEAD already is the run).")


def head_files(root: Path, rev: str) -> dict[str, bytes]:
    """params.yaml, dvc.lock and every metrics/ file as committed in rev, by repo path."""
    tree = git(root, "ls-tree", "-r", "--name-only", rev, "--", *RUN_FILES, METRICS_DIR)
    paths = tree.splitlines()
    missing = [p for p in RUN_FILES if p not in paths]
    if missing:
        raise ArchiveError(f"commit {rev[:12]} has no {', '.join(missing)}: archive a commit "
                           "that holds a finished `dvc repro` (params.yaml, dvc.lock, metrics/)")
    if not any(p.startswith(f"{METRICS_DIR}/") for p in paths):
        raise ArchiveError(f"commit {rev[:12]} has no {METRICS_DIR}/ files: run `dvc repro` and "
                           "commit its metrics before archiving")
    return {p: git(root, "show", f"{rev}:{p}", binary=True) for p in paths}


def stale_metrics(blobs: dict[str, bytes]) -> list[str]:
    """Metrics files whose bytes are not the md5 that dvc.lock recorded for them.

    dvc 3 records `hash: md5` + the md5 of the file's bytes for every output, cache: false ones
    included, so a metrics file edited by hand or a lock from another run shows up here.
    """
    lock = yaml.safe_load(blobs["dvc.lock"]) or {}
    bad = []
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            path = out.get("path", "")
            if path in blobs and out.get("hash") == "md5" and "md5" in out:
                got = hashlib.md5(blobs[path]).hexdigest()
                if got != out["md5"]:
                    bad.append(f"{path} (stage {stage}: lock md5 {out['md5']}, file {got})")
    return bad


def numbers(obj, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a metrics JSON as dotted keys, the way `dvc metrics` flattens them."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(prefix[:-1], obj)]
    return []  # lists and strings: dvc metrics ignores them too


def _fmt(v) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def key_number_tables(blobs: dict[str, bytes]) -> list[str]:
    """One markdown table per metrics file; files of one folder with the same keys (the bench
    variants) share one table, a column each, so variants read side by side."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for path in sorted(p for p in blobs if p.startswith(f"{METRICS_DIR}/")):
        try:
            rows = dict(numbers(json.loads(blobs[path])))
        except ValueError:
            continue  # not JSON (a .yaml or .tsv metrics file): it is copied, not tabled
        if rows:
            groups.setdefault((str(Path(path).parent), tuple(rows)), []).append((path, rows))
    lines = []
    for (folder, keys), members in groups.items():
        if len(members) == 1:
            lines += [f"`{members[0][0]}`", ""]
            names = ["value"]
        else:
            lines += [f"`{folder}/` " + ", ".join(f"`{Path(p).name}`" for p, _ in members), ""]
            names = [Path(p).stem for p, _ in members]
        lines += ["| metric | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        lines += [f"| {k} | " + " | ".join(_fmt(r.get(k)) for _, r in members) + " |"
                  for k in keys]
        lines.append("")
    return lines


def readme(name: str, reason: str, rev: str, commit: dict, blobs: dict[str, bytes]) -> str:
    lock = yaml.safe_load(blobs["dvc.lock"]) or {}
    stages = ", ".join(lock.get("stages") or {}) or "(none recorded)"
    lines = [
        f"# Archived run: {name}", "",
        f"**Why archived:** {reason}", "",
        "## What the run was", "",
        f"- commit `{rev}` ({commit['date']}): {commit['subject']}",
        f"- stages in its dvc.lock: {stages}",
        "- `params.yaml` and `dvc.lock` here are that commit's; `metrics/` its metrics files.",
        "", "Compare it with the active run (works without the tag, from any full clone):", "",
        "```bash",
        f"dvc metrics diff $(cat archive/{name}/rev) HEAD --md",
        f"make report BASE={name}",
        f"git checkout $(cat archive/{name}/rev) && dvc repro   # rerun it",
        "```", "", "## Key numbers", "",
    ]
    lines += key_number_tables(blobs)
    params = yaml.safe_load(blobs["params.yaml"]) or {}
    flat = [f"{k} = {json.dumps(v)}" for k, v in _flatten(params)]
    lines += ["<details><summary>params.yaml of the run, flattened</summary>", "", "```",
              *flat, "```", "", "</details>", ""]
    return "\n".join(lines)


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], obj


def archive(name: str, reason: str, cwd: Path | None = None) -> Path:
    """Write archive/NAME/ from HEAD and tag HEAD archive/NAME; -> the folder."""
    if not reason.strip():
        raise ArchiveError("--reason is empty: say why this run is archived (it heads the README)")
    root = repo_root(cwd)
    check_name(root, name)
    check_committed(root)
    rev = git(root, "rev-parse", "--verify", "HEAD^{commit}").strip()
    blobs = head_files(root, rev)
    stale = stale_metrics(blobs)
    if stale:
        raise ArchiveError(
            "HEAD's metrics are not the ones its dvc.lock recorded:\n  " + "\n  ".join(stale) +
            "\nRerun the pipeline (`dvc repro`), commit params.yaml, dvc.lock and metrics/ "
            "together, then archive.")
    subject, date = git(root, "log", "-1", "--format=%s%n%cI", rev).splitlines()[:2]
    folder = root / ARCHIVE_DIR / name
    with files.atomic_dir(folder) as tmp:
        for path, data in blobs.items():
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(data)
        (tmp / "rev").write_text(rev + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(
            readme(name, reason.strip(), rev, {"subject": subject, "date": date}, blobs),
            encoding="utf-8")
    try:
        git(root, "tag", "-a", f"{ARCHIVE_DIR}/{name}", "-m", f"Archived run {name}: {reason}",
            rev)
    except ArchiveError:
        shutil.rmtree(folder)  # all or nothing: no folder without its tag
        raise
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("name", help="archive name: folder archive/NAME and tag archive/NAME")
    p.add_argument("--reason", required=True, help="why the run is archived (heads its README)")
    args = p.parse_args(argv)
    try:
        folder = archive(args.name, args.reason)
    except ArchiveError as e:
        sys.exit(f"archive: {e}")
    rel = folder.relative_to(repo_root())
    rev = (folder / "rev").read_text().strip()
    print(f"archived {rev} as {rel}/ and tag {ARCHIVE_DIR}/{args.name}\n"
          f"next: git add {rel} && git commit -m 'Archive run {args.name}'\n"
          f"      git push origin {ARCHIVE_DIR}/{args.name}   # optional: rev is what counts")


if __name__ == "__main__":
    main()
