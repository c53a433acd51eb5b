"""Stall watchdog: no progress for too long -> every thread's stack to the log, the reason on
stderr, and a non-zero exit, instead of a run that hangs silently for hours.

    python -m stages.train ...      # starts one before importing torch / loading the model

    dog = watchdog.Watchdog(setup_limit=600, step_limit=300).start()  # set-up phase
    dog.beat("loading base")        # progress during set-up
    dog.training()                  # from now on the step limit applies
    dog.beat("step 12")             # once per optimizer step
    dog.stop()

The origin's 7.7-hour hang sat in model preparation, before any step: so the clock runs from
the moment this module is imported (the stage imports it first), with its own set-up limit.

Two layers, because a hang can hold the GIL (a C loop) and starve a Python thread:
- a Python thread checks every second and, past the limit, writes the reason, dumps every
  thread's stack with faulthandler and calls os._exit(STALL_EXIT) (os._exit: a hung non-daemon
  thread or an atexit hook cannot block the exit);
- faulthandler.dump_traceback_later, re-armed at every beat at 1.5x the limit, does the same
  from C (exit code 1) if the Python thread never gets to run.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

STALL_EXIT = 3           # exit status of a stall caught by the Python thread
BACKSTOP = 1.5           # the C-level backstop fires at 1.5x the limit: still within 2x
IMPORTED_AT = time.monotonic()


class Watchdog:
    def __init__(self, setup_limit: float, step_limit: float, stream=None):
        if setup_limit <= 0 or step_limit <= 0:
            raise ValueError(f"watchdog limits must be > 0 seconds, got set-up {setup_limit}, "
                             f"step {step_limit}; fix train.setup_stall_seconds / stall_seconds")
        self.setup_limit, self.step_limit = float(setup_limit), float(step_limit)
        self.stream = stream or sys.stderr
        self.limit = self.setup_limit
        self.in_training = False
        self.phase = "set-up (process start)"
        self.last = IMPORTED_AT  # set-up is counted from process start, not from here
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._arm()
        self._thread.start()
        return self

    def _arm(self) -> None:
        remaining = self.last + self.limit * BACKSTOP - time.monotonic()
        faulthandler.cancel_dump_traceback_later()
        faulthandler.dump_traceback_later(max(remaining, 0.1), exit=True, file=self.stream)

    def beat(self, phase: str | None = None) -> None:
        """Progress: reset the clock (and say what is being done, for the stall message)."""
        with self._lock:
            self.last = time.monotonic()
            if phase is not None:
                self.phase = phase
            self._arm()

    def training(self) -> None:
        """Set-up is over: the per-step limit applies from now on."""
        with self._lock:
            self.limit = self.step_limit
            self.in_training = True
        self.beat("training")

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.limit / 10)):
            with self._lock:
                idle, limit, phase = time.monotonic() - self.last, self.limit, self.phase
            if idle > limit:
                self._fire(idle, limit, phase)

    def _fire(self, idle: float, limit: float, phase: str) -> None:
        which = "train.stall_seconds" if self.in_training else "train.setup_stall_seconds"
        msg = (f"\nWATCHDOG: no progress for {idle:.0f} s during {phase!r} (limit {limit:.0f} s, "
               f"{which}); stacks of every thread follow, then exit {STALL_EXIT}.\n")
        try:
            self.stream.write(msg)
            self.stream.flush()
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
            self.stream.write(f"WATCHDOG: stalled in {phase!r}; exiting with status "
                              f"{STALL_EXIT}. Raise {which} in params.yaml if this step is "
                              "legitimately that slow.\n")
            self.stream.flush()
        finally:
            os._exit(STALL_EXIT)
