"""The stall watchdog fires within 2x its limit on an injected hang, in set-up (model loading)
and mid-training: every thread's stack in the log, the reason on stderr, a non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lorapipe import config, watchdog

REPO = Path(__file__).resolve().parents[1]

# Runs the real stage main() in a subprocess with one function replaced by a hang; the hang
# writes when it started, so the test can time the watchdog from there.
HANG = """
import sys, time
from lorapipe import watchdog  # first, as in stages/train.py: the set-up clock starts here
import stages.train
from lorapipe import lora
import torch

marker, where = sys.argv[1], sys.argv[2]

def hang(*a, **k):
    open(marker, "w").write(str(time.time()))
    while True:
        time.sleep(0.05)  # a hung collective / a stuck loader: no progress, no exception

if where == "setup":
    lora.load_base = hang
else:
    real, calls = torch.optim.AdamW.step, []
    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            hang()
        return real(self, *a, **k)
    torch.optim.AdamW.step = step
stages.train.main(sys.argv[3:])
"""


def run_hang(tmp_path: Path, tiny_base: Path, where: str, setup: float, step: float):
    raw = config.read_yaml(REPO / "params.yaml")
    raw["base"]["precision"] = "fp32"
    raw["train"].update(steps=4, max_length=64, global_batch=2, micro_batch=2, heldout_rows=2,
                        eval_batch=2, setup_stall_seconds=setup, stall_seconds=step)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rows = [{"id": str(i), "source": "t", "messages": [
        {"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(8)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marker = tmp_path / "hang_started"
    args = ["--base", str(tiny_base), "--train", str(data), "--heldout", str(data),
            "--out", str(tmp_path / "adapter"), "--checkpoints", str(tmp_path / "ck"),
            "--live", str(tmp_path / "live"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.time()
    p = subprocess.run([sys.executable, "-c", HANG, str(marker), where, *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    return p, started, ended, marker


def test_watchdog_fires_in_setup(tmp_path, tiny_base):
    # the set-up clock runs from process start (imports of torch etc. included) and restarts
    # at each set-up beat; 15 s leaves the imports room on a busy 2-core machine
    limit = 15
    p, _, ended, marker = run_hang(tmp_path, tiny_base, "setup", limit, 600)
    assert marker.exists(), p.stderr[-3000:]
    assert p.returncode == watchdog.STALL_EXIT, p.stderr[-3000:]
    assert ended - float(marker.read_text()) <= 2 * limit
    assert "WATCHDOG: no progress" in p.stderr and "train.setup_stall_seconds" in p.stderr
    assert "loading base at fp32" in p.stderr           # what it was doing
    assert 'in hang' in p.stderr and "stall-watchdog" not in p.stdout  # stacks in the log
    assert "Thread 0x" in p.stderr or "Current thread" in p.stderr
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "m.json").exists()


def test_watchdog_fires_mid_training(tmp_path, tiny_base):
    limit = 3
    p, _, ended, marker = run_hang(tmp_path, tiny_base, "train", 600, limit)
    assert marker.exists(), p.stderr[-3000:]
    hung_at = float(marker.read_text())
    assert p.returncode == watchdog.STALL_EXIT, p.stderr[-3000:]
    assert ended - hung_at <= 2 * limit, ended - hung_at
    assert "WATCHDOG: no progress" in p.stderr and "train.stall_seconds" in p.stderr
    assert "during 'step 1'" in p.stderr
    assert 'in hang' in p.stderr and "in train_loop" in p.stderr


def test_watchdog_rejects_nonpositive_limits():
    import pytest

    with pytest.raises(ValueError, match="stall_seconds"):
        watchdog.Watchdog(0, 10)
