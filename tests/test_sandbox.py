"""The sandbox contains each hostile behaviour, reports it failed, and changes nothing outside
its temporary folder; with and without Linux namespaces (the audit hook alone must hold)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapipe.sandbox import Limits, run_source

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(wall_s=4, cpu_s=3, memory_mb=1024, nproc=16, fsize_mb=8)


@pytest.fixture()
def outside(tmp_path):
    """A folder outside the sandbox with a sentinel file a hostile program goes after."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "sentinel.txt").write_text("keep")
    return d


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


HOSTILE = {
    "delete": "import os\nos.remove({s!r})\n",
    "delete_swallowed": "import os\ntry:\n    os.remove({s!r})\nexcept OSError:\n    pass\n",
    "overwrite": "open({s!r}, 'w').write('pwned')\n",
    "os_open": "import os\nos.close(os.open({s!r}, os.O_WRONLY | os.O_TRUNC))\n",
    "new_file": "open({d!r} + '/new.txt', 'w').write('x')\n",
    "rename": "import os\nos.rename({s!r}, {d!r} + '/moved')\n",
    "rmtree": "import shutil\nshutil.rmtree({d!r})\n",
    "shell": "import os\nos.system('rm -f ' + {s!r})\n",
    "subprocess": "import subprocess\nsubprocess.run(['rm', '-f', {s!r}])\n",
    "ctypes": "import ctypes\nctypes.CDLL(None).unlink({s!r}.encode())\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "huge_alloc": "x = bytearray(40 * 2**30)\n",
    "infinite_loop": "while True:\n    pass\n",
    "huge_file": "with open('big', 'wb') as f:\n    for _ in range(100):\n        f.write(b'x' * 2**20)\n",
    "connect": "import socket\nsocket.create_connection(('93.184.216.34', 80), timeout=2)\n",
    "connect_ip_raw": "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))\n",
}


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "hook_only"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_contained(name, namespaces, outside):
    before = snapshot(outside)
    src = HOSTILE[name].format(s=str(outside / "sentinel.txt"), d=str(outside))
    t = time.time()
    result = run_source(src, LIMITS, namespaces=namespaces)
    assert not result.passed, result
    assert result.reason and result.reason != "passed"
    assert time.time() - t < LIMITS.wall_s + 3          # the timeout really kills it
    assert snapshot(outside) == before                    # nothing outside changed


def test_reasons_name_the_limit(outside):
    assert "violation" in run_source(HOSTILE["delete"].format(s=str(outside / "sentinel.txt"),
                                                             d=""), LIMITS).reason
    # a busy loop meets the CPU limit (3 s) or the wall timeout (4 s), whichever comes first
    assert run_source(HOSTILE["infinite_loop"], LIMITS).reason.startswith(
        ("timeout", "killed by SIGKILL (CPU limit"))
    assert run_source("import time\ntime.sleep(60)\n", LIMITS).reason.startswith("timeout")
    assert "fork budget" in run_source(HOSTILE["fork_bomb"], LIMITS).reason
    assert "memory" in run_source(HOSTILE["huge_alloc"], LIMITS).reason.lower()
    assert "File too large" in run_source(HOSTILE["huge_file"], LIMITS).reason


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "hook_only"])
def test_correct_program_passes_and_may_use_its_folder(namespaces):
    src = ("import os, math\n"
           "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
           "os.remove('scratch.txt')\n"
           "def f(x):\n    return math.sqrt(x)\nassert f(16) == 4\n")
    assert run_source(src, LIMITS, namespaces=namespaces).passed


def test_failing_program_fails():
    r = run_source("assert 1 + 1 == 3, 'wrong sum'\n", LIMITS)
    assert not r.passed and "AssertionError: wrong sum" in r.reason


def test_environment_scrubbed_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("LORAPIPE_SECRET", "s3cret")
    src = ("import os, sys\nassert 'LORAPIPE_SECRET' not in os.environ, 'env leaked'\n"
           "assert sys.stdin is None or sys.stdin.read() == '', 'stdin open'\n"
           "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
           "assert os.environ['HOME'] == os.getcwd()\n")
    assert run_source(src, LIMITS).passed


def test_cli_prints_one_json_line(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("print('hello')\n")
    bad.write_text("while True:\n    pass\n")
    out = []
    for f in (good, bad):
        proc = subprocess.run([sys.executable, "-m", "lorapipe.sandbox", str(f), "--timeout",
                               "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1
        out.append(json.loads(lines[0]))
    assert out[0] == {"passed": True, "reason": "passed"}
    assert out[1]["passed"] is False and out[1]["reason"].startswith("timeout")
