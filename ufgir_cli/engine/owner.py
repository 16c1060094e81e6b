"""Who trains a run, written where every other process can read it: ``status.json`` in the run folder.

Rank 0 writes, atomically, at start (pid, host, start time, state "running"), every
HEARTBEAT_EVERY_S from a daemon thread (so the heartbeat goes on through a long evaluation or a
slow checkpoint write), at every checkpoint save (its step and epoch: where a resume starts), and at
the end: "done", "stopped" with the signal, or "failed" with the error's one line. A process killed
outright (SIGKILL, out of memory, a dead node) writes nothing more: readers then see a dead pid on
its host, or a stale heartbeat from anywhere else, and call the run resumable
(:meth:`ufgir_cli.paths.RunDir.status`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from ..io import atomic_write_json
from ..paths import HEARTBEAT_EVERY_S, RunDir, this_host


def one_line(err: BaseException) -> str:
    """An error's message as the run's failure reason: its first line, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class RunOwner:
    """``with RunOwner(run_dir, state, is_main):`` around the training loop. ``state`` is the loop's
    `TrainState`, read (never written) by the heartbeat for the step it reports. Ranks other than 0
    do nothing. :meth:`saved` records a checkpoint's step; the run's `Checkpointer` calls it."""

    def __init__(self, run_dir: Path, state, is_main: bool = True, every_s: float = HEARTBEAT_EVERY_S):
        self.run, self.state, self.is_main, self.every_s = RunDir(run_dir), state, is_main, every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record: dict = {}

    def __enter__(self) -> RunOwner:
        if not self.is_main:
            return self
        before = self.run.read_status()
        now = time.time()
        self.record = {"state": "running", "pid": os.getpid(), "host": this_host(), "started": now, "heartbeat": now,
                       "step": self.state.step, "epoch": self.state.epoch,
                       "saved_step": before.get("saved_step"), "saved_epoch": before.get("saved_epoch")}
        self._write()
        self._thread = threading.Thread(target=self._beat, name="ufgir-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()

    def _write(self, **update) -> None:
        """Rewrite ``status.json`` whole (atomically). The record is advisory: a failed write (disk full)
        never stops training; the next beat tries again."""
        with self._lock:
            self.record.update(update, heartbeat=time.time(), step=self.state.step, epoch=self.state.epoch)
            with contextlib.suppress(OSError):
                atomic_write_json(self.run.status_file, self.record)

    def saved(self, tag: str, step: int, epoch: int) -> None:
        """A checkpoint was written: ``last`` is where a resume starts."""
        if self.is_main and self.record and tag == "last":
            self._write(saved_step=step, saved_epoch=epoch)

    def __exit__(self, kind, err, tb) -> None:
        if not self.is_main or not self.record:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        signum = getattr(err, "signum", None)  # engine.state.Interrupted: a stop signal, checkpoint saved
        if err is None:
            # training is over; the final evaluation's files come next (``done`` needs them: RunDir.status)
            self._write(state="done", reason=None)
        elif signum is not None:
            self._write(state="stopped", reason=f"stopped by {signal.Signals(signum).name}")
        elif isinstance(err, KeyboardInterrupt):
            self._write(state="stopped", reason="stopped at once by a second signal")
        else:
            self._write(state="failed", reason=one_line(err))

