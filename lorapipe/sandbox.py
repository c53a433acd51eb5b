"""Run one untrusted Python program (model-written code) in a contained child process.

    python -m lorapipe.sandbox FILE --timeout SECONDS     # prints {"passed": bool, "reason": str}

Limits other than the wall timeout come from params.yaml's `bench` section (--params).

Layers, each enough alone for the common case, together for defence in depth:
1. A separate process in its own session: wall timeout, then SIGKILL of the whole group.
2. rlimits: RLIMIT_CPU (seconds), RLIMIT_AS (memory), RLIMIT_FSIZE (largest file written),
   RLIMIT_NPROC (processes; the kernel does not apply it to root, hence layer 4's fork budget).
3. Linux namespaces where the kernel allows an unprivileged user namespace (checked per run):
   a fresh network namespace (only a downed loopback: no connection can leave), a mount
   namespace in which every mount is read-only except the program's temporary folder (locked
   by a nested user namespace so the program cannot remount it), and a PID namespace whose
   init is the program: when it dies, every process it forked dies with it.
4. An audit hook installed before the program runs (sys.addaudithook cannot be removed from
   Python code). Any of these ends the program at once with exit code 97 and the reason:
   opening a file for writing, deleting, renaming or chmod-ing a path outside its folder;
   creating an internet socket; exec/spawn/system/subprocess; loading native code via ctypes;
   more forks than the budget (tokens read from an inherited pipe, so the budget is shared by
   the whole process tree).
The program starts in an empty temporary folder (HOME and TMPDIR point there), with a scrubbed
environment, stdin closed, `python -I -B` (no user site, no PYTHON* variables, no .pyc writes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

VIOLATION_RC = 97      # the audit hook's exit code: the program did something it may not
SETUP_RC = 98          # the child could not set up its limits (a sandbox bug, not the program's)
_TAIL = 2000           # characters of stderr kept for the reason


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float      # wall-clock seconds before the whole process group is killed
    cpu_s: int         # RLIMIT_CPU
    memory_mb: int     # RLIMIT_AS (address space, so a 40 GB allocation fails at once)
    nproc: int         # RLIMIT_NPROC and the fork budget of the audit hook
    fsize_mb: int      # RLIMIT_FSIZE: the largest file the program may write


@dataclasses.dataclass(frozen=True)
class Result:
    passed: bool
    reason: str

    def json(self) -> str:
        return json.dumps({"passed": self.passed, "reason": self.reason})


# The child: runs as `python -I -B -c _CHILD <json>`; sets limits, namespaces and the hook, then
# runs the program as __main__. Kept as source text so it needs nothing importable from here.
_CHILD = r'''
import ctypes, json, os, resource, runpy, sys
cfg = json.loads(sys.argv[1])
work, tokens_fd = cfg["work"], cfg["tokens_fd"]
MB = 1 << 20
def limit(res, value):               # never above an existing hard limit (non-root can't)
    hard = resource.getrlimit(res)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(res, (value, value))
try:
    limit(resource.RLIMIT_CPU, cfg["cpu_s"])
    limit(resource.RLIMIT_AS, cfg["memory_mb"] * MB)
    limit(resource.RLIMIT_FSIZE, cfg["fsize_mb"] * MB)
    limit(resource.RLIMIT_NPROC, cfg["nproc"])
    limit(resource.RLIMIT_CORE, 0)
except (ValueError, OSError) as e:
    sys.stderr.write(f"sandbox setup: setrlimit failed: {e}\n"); os._exit(98)

def namespaces():
    """User+mount+net+pid namespaces; the file system read-only except `work`. False if the
    kernel refuses (containers without user namespaces): the audit hook still applies."""
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWUSER, NEWNET, NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
    uid, gid = os.getuid(), os.getgid()
    def enter_userns(flags):
        if libc.unshare(NEWUSER | flags) != 0:
            return False
        with open("/proc/self/setgroups", "w") as f: f.write("deny")
        with open("/proc/self/uid_map", "w") as f: f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f: f.write(f"{gid} {gid} 1")
        return True
    if not enter_userns(NEWNS | NEWNET | NEWPID):
        return False
    class Attr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "prop", "userns")]
    def setattr_(path, set_, clr, flags):  # mount_setattr(2), syscall 442 on x86-64 and arm64
        a = Attr(set_, clr, 0, 0)
        if libc.syscall(442, -100, path.encode(), flags, ctypes.byref(a), ctypes.sizeof(a)):
            raise OSError(ctypes.get_errno(), f"mount_setattr {path}")
    MS_BIND, MS_REC, MS_PRIVATE, RDONLY, AT_RECURSIVE = 4096, 16384, 1 << 18, 1, 0x8000
    try:
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) or \
           libc.mount(work.encode(), work.encode(), None, MS_BIND | MS_REC, None):
            raise OSError(ctypes.get_errno(), "mount")
        setattr_("/", RDONLY, 0, AT_RECURSIVE)      # everything read-only ...
        setattr_(work, 0, RDONLY, 0)                # ... except the program's folder
        # a nested user namespace copies the mounts and locks their read-only flag: the
        # program holds capabilities only there and cannot remount anything writable
        if not enter_userns(NEWNS):
            raise OSError(ctypes.get_errno(), "nested user namespace")
    except OSError as e:        # net and pid namespaces hold; the audit hook guards files
        sys.stderr.write(f"sandbox: read-only mounts unavailable ({e}); audit hook only\n")
    return True

isolated = cfg["namespaces"] and namespaces()
if isolated:
    pid = os.fork()                 # the first child is PID 1 of the new PID namespace
    if pid:
        os.close(tokens_fd)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status)
                 else 128 + os.WTERMSIG(status))
os.chdir(work)
root = os.path.realpath(work) + os.sep
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
               "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
               "os.link": (0, 1), "os.symlink": (1,), "shutil.rmtree": (0,),
               "os.chflags": (0,), "os.lchmod": (0,)}
DENIED = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
          "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg")

def deny(why):
    try: os.write(2, f"\nSANDBOX VIOLATION: {why}\n".encode())
    finally: os._exit(97)

def inside(path):
    if isinstance(path, int):
        return True                 # an already-open descriptor: its open was checked
    p = os.path.realpath(os.fsdecode(path))
    return (p + os.sep).startswith(root)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                 (isinstance(flags, int) and flags & WRITE)
        if writes and path is not None and not inside(path):
            deny(f"write outside its folder: {path}")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if not inside(args[i]):
                deny(f"{event} outside its folder: {args[i]}")
    elif event == "socket.__new__":
        if args[1] not in (1,):     # AF_UNIX (1) only
            deny(f"network socket (family {args[1]})")
    elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
        deny(f"{event}")
    elif event in ("os.fork", "os.forkpty"):
        try:
            if not os.read(tokens_fd, 1):
                deny("fork budget exhausted")
        except BlockingIOError:
            deny("fork budget exhausted (unbounded forking)")
        except OSError as e:
            deny(f"fork budget unreadable: {e}")
    elif event.startswith(DENIED):
        deny(f"{event} is not allowed")

sys.addaudithook(hook)
sys.argv = [cfg["program"]]
runpy.run_path(cfg["program"], run_name="__main__")
'''


def run_source(source: str, limits: Limits, namespaces: bool = True) -> Result:
    """Write `source` into a fresh temporary folder and run it there under `limits`."""
    with tempfile.TemporaryDirectory(prefix="lorapipe-sandbox-") as work:
        program = Path(work) / "program.py"
        program.write_text(source, encoding="utf-8")
        return _run(program, Path(work), limits, namespaces)


def run_file(path: str | Path, limits: Limits, namespaces: bool = True) -> Result:
    return run_source(Path(path).read_text(encoding="utf-8"), limits, namespaces)


def _run(program: Path, work: Path, limits: Limits, namespaces: bool) -> Result:
    read_fd, write_fd = os.pipe()
    # the fork budget: nproc tokens in a pipe the whole process tree shares (64 KiB pipe buffer)
    os.write(write_fd, b"t" * min(limits.nproc, 60000))
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    cfg = {"work": str(work), "program": str(program), "tokens_fd": read_fd,
           "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "fsize_mb": limits.fsize_mb,
           "nproc": limits.nproc, "namespaces": namespaces}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0"}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _CHILD, json.dumps(cfg)], cwd=work, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(read_fd,), start_new_session=True)
    finally:
        os.close(read_fd)
    try:
        _, err = proc.communicate(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return Result(False, f"timeout: still running after {limits.wall_s:g} s wall time")
    _kill_group(proc)       # leftovers of a tree that outlived its parent (no PID namespace)
    return _verdict(proc.returncode, err.decode("utf-8", "replace")[-_TAIL:], limits)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(rc: int, err: str, limits: Limits) -> Result:
    last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
    if rc == 0:
        return Result(True, "passed")
    if rc == VIOLATION_RC:
        why = err.split("SANDBOX VIOLATION:")[-1].strip() if "SANDBOX VIOLATION" in err else ""
        return Result(False, f"sandbox violation: {why or 'exit 97'}")
    if rc == SETUP_RC:
        raise RuntimeError(f"sandbox could not start the program: {last}")
    if rc < 0 or rc > 128:
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        hint = {"SIGKILL": f" (CPU limit {limits.cpu_s} s or memory)",
                "SIGXCPU": f" (CPU limit {limits.cpu_s} s)",
                "SIGXFSZ": f" (file size limit {limits.fsize_mb} MB)"}.get(str(name), "")
        return Result(False, f"killed by {name}{hint}")
    if "MemoryError" in last:
        return Result(False, f"memory limit {limits.memory_mb} MB: {last}")
    return Result(False, f"exit code {rc}: {last or 'no error output'}")


def limits_from(cfg, wall_s: float | None = None) -> Limits:
    """The sandbox limits of a config.Bench section (wall_s overrides code_timeout_s)."""
    return Limits(wall_s=cfg.code_timeout_s if wall_s is None else wall_s,
                  cpu_s=cfg.sandbox_cpu_s, memory_mb=cfg.sandbox_memory_mb,
                  nproc=cfg.sandbox_nproc, fsize_mb=cfg.sandbox_fsize_mb)


def main(argv=None) -> None:
    from lorapipe import config

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("file", help="the Python program to run")
    p.add_argument("--timeout", type=float, required=True, help="wall-clock seconds")
    p.add_argument("--params", default="params.yaml",
                   help="params file whose bench section holds the other limits")
    args = p.parse_args(argv)
    limits = limits_from(config.load(args.params, "bench"), args.timeout)
    print(run_file(args.file, limits).json(), flush=True)


if __name__ == "__main__":
    main()
