"""`python -m lorapipe.archive`: in a temporary git + dvc repo whose run is a real `dvc repro`.

The folder holds the HEAD commit's params, lock and metrics with rev == HEAD, HEAD is tagged,
and the command refuses an existing archive, an uncommitted run and metrics the lock disowns.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# A one-stage pipeline with the shapes of the real one: params.yaml, git-tracked metrics (one
# nested under metrics/bench/), dvc.lock recording their md5.
DVC_YAML = {"stages": {"score": {
    "cmd": "python score.py",
    "deps": ["score.py"],
    "params": ["train.lr"],
    "metrics": [{"metrics/train.json": {"cache": False}},
                {"metrics/bench/base.json": {"cache": False}}],
}}}
SCORE_PY = """\
import json, os, yaml
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
os.makedirs("metrics/bench", exist_ok=True)
json.dump({"heldout_loss_after": round(1 / (1 + 1000 * lr), 4), "tokens": 1000},
          open("metrics/train.json", "w"))
json.dump({"math_accuracy": round(100 * lr, 4), "math_n": 4}, open("metrics/bench/base.json", "w"))
"""


def env() -> dict:
    """Our venv's python/dvc first on PATH, a fixed git identity, no user or system git config."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                PYTHONPATH=str(REPO), GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")


def sh(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def head(repo: Path) -> str:
    return sh(repo, "git", "rev-parse", "HEAD").stdout.strip()


def run_pipeline(repo: Path, lr: float, message: str) -> str:
    """Set train.lr, `dvc repro`, commit params + lock + metrics; -> the commit's hash."""
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "steps": 10}}))
    sh(repo, sys.executable, "-m", "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)
    return head(repo)


def make_repo(root: Path, lr: float = 0.001) -> Path:
    """git init + dvc init + the one-stage pipeline, run once and committed."""
    repo = root / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, sys.executable, "-m", "dvc", "init", "-q")
    sh(repo, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / "score.py").write_text(SCORE_PY)
    run_pipeline(repo, lr, "run 1")
    return repo


def archive(repo: Path, name: str, reason: str = "INT4 merge drifts") -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "lorapipe.archive", name, "--reason", reason, check=False)


def tag_commit(repo: Path, tag: str) -> str | None:
    r = sh(repo, "git", "rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}", check=False)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path)


def test_archive_writes_head_run_and_tags_it(repo):
    rev = head(repo)
    r = archive(repo, "int4-qlora-phase1a", "merged INT4 model drifts from the adapter")
    assert r.returncode == 0, r.stderr
    folder = repo / "archive" / "int4-qlora-phase1a"
    assert (folder / "rev").read_text() == rev + "\n"
    assert len(rev) == 40
    assert tag_commit(repo, "archive/int4-qlora-phase1a") == rev
    for path in ("params.yaml", "dvc.lock", "metrics/train.json", "metrics/bench/base.json"):
        assert (folder / path).read_bytes() == (repo / path).read_bytes(), path
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "dvc.lock", "metrics/bench/base.json", "metrics/train.json", "params.yaml",
        "rev"]
    readme = (folder / "README.md").read_text()
    assert "merged INT4 model drifts from the adapter" in readme     # why
    assert rev in readme and "run 1" in readme                        # what: commit + subject
    assert "| math_accuracy | 0.1 |" in readme                        # key numbers, bench too
    assert "| heldout_loss_after | 0.5 |" in readme
    assert "train.lr = 0.001" in readme
    assert f"dvc metrics diff $(cat archive/int4-qlora-phase1a/rev) HEAD" in readme
    assert "git add archive/int4-qlora-phase1a" in r.stdout         # says what to do next


def test_refuses_to_overwrite_folder_or_tag(repo):
    assert archive(repo, "run-a").returncode == 0
    first = (repo / "archive/run-a/README.md").read_text()
    again = archive(repo, "run-a", "another reason")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert (repo / "archive/run-a/README.md").read_text() == first
    # committed folder, tag gone (a clone without tags): the folder alone still refuses
    sh(repo, "git", "add", "archive")
    sh(repo, "git", "commit", "-qm", "Archive run-a")
    sh(repo, "git", "tag", "-d", "archive/run-a")
    r = archive(repo, "run-a")
    assert r.returncode != 0 and "archive/run-a already exists" in r.stderr
    assert tag_commit(repo, "archive/run-a") is None
    # a leftover tag without a folder refuses too
    sh(repo, "git", "tag", "archive/run-b")
    r = archive(repo, "run-b")
    assert r.returncode != 0 and "tag archive/run-b already exists" in r.stderr
    assert not (repo / "archive/run-b").exists()


@pytest.mark.parametrize("change", ["metric", "params", "untracked metric", "lock"])
def test_refuses_uncommitted_run(repo, change):
    if change == "metric":
        (repo / "metrics/train.json").write_text(json.dumps({"heldout_loss_after": 0.1}))
    elif change == "params":
        (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.5, "steps": 10}}))
    elif change == "untracked metric":
        (repo / "metrics/bench/merged.json").write_text(json.dumps({"math_accuracy": 0.3}))
    else:
        (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text() + "\n# edited\n")
    r = archive(repo, "dirty")
    assert r.returncode != 0
    assert "the run is not committed" in r.stderr and "git add" in r.stderr
    assert not (repo / "archive").exists()
    assert tag_commit(repo, "archive/dirty") is None


def test_refuses_metrics_the_lock_did_not_record(repo):
    """Committed, but metrics edited by hand after `dvc repro`: not that run's numbers."""
    (repo / "metrics/bench/base.json").write_text(json.dumps({"math_accuracy": 0.99}))
    sh(repo, "git", "commit", "-qam", "hand-edited metric")
    r = archive(repo, "edited")
    assert r.returncode != 0
    assert "metrics/bench/base.json" in r.stderr and "dvc.lock recorded" in r.stderr
    assert not (repo / "archive").exists() and tag_commit(repo, "archive/edited") is None


def test_refuses_bad_names_and_empty_reason(repo):
    for name in ("", "has space", "../up", "a..b", "x.lock", "_x", "a/b"):
        r = archive(repo, name)
        assert r.returncode != 0 and "not usable as a folder and tag name" in r.stderr, name
    r = archive(repo, "ok-name", "  ")
    assert r.returncode != 0 and "--reason is empty" in r.stderr
    assert not (repo / "archive").exists()


def test_key_numbers_put_same_key_files_side_by_side():
    from lorapipe.archive import key_number_tables

    blobs = {"metrics/bench/base.json": b'{"math_accuracy": 0.1, "n": 4, "items": [1]}',
             "metrics/bench/merged.json": b'{"math_accuracy": 0.25, "n": 4}',
             "metrics/train.json": b'{"loss": {"before": 2.5, "after": 1.75}, "ok": true}'}
    md = "\n".join(key_number_tables(blobs))
    assert "| metric | base | merged |" in md
    assert "| math_accuracy | 0.1 | 0.25 |" in md and "| n | 4 | 4 |" in md
    assert "| loss.before | 2.5 |" in md and "| loss.after | 1.75 |" in md
    assert "items" not in md and "| ok" not in md  # lists and booleans: not numbers
