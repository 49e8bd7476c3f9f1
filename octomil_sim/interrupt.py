"""Ctrl-C (SIGINT) and SIGTERM stop a run between rounds, with its checkpoint kept and Ray shut down.

Python turns SIGINT into a ``KeyboardInterrupt`` in the main thread. In a simulation the main thread
runs Flower's simulation engine while the ServerApp runs in another thread: the interrupt ended the
engine and left the ServerApp thread waiting for replies that never came (the run hung in a futex
wait until a second Ctrl-C). Here the first signal only asks the run to stop: the ServerApp finishes
the round it is in, checkpoints it, and returns; Flower then ends the engine and Ray as after a
normal run, and the command exits with 128 + the signal's number (130, 143) and one line saying how
to resume. A second signal while stopping ends the process at once (exit 128 + its number).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first SIGINT / SIGTERM; ``signum`` says which."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def rearm(self) -> None:
        """Install the handlers again: ``ray.init`` puts its own SIGTERM handler (which aborts the
        driver) in place of ours."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self.handle)

    def handle(self, signum: int, frame) -> None:
        if self.event.is_set():  # the second one: stop now, without waiting for the round
            print(f"stopped by a second {signal.Signals(signum).name}; the newest checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)  # Ray's processes share the driver's fate (PR_SET_PDEATHSIG) and exit too
        self.signum = signum
        self.event.set()


class Interrupted(Exception):
    """The run stopped on a signal after ``last_round`` (0: before any round)."""

    def __init__(self, signum: int, last_round: int, output_dir: Path, checkpointed: bool):
        self.signum, self.last_round, self.output_dir, self.checkpointed = signum, last_round, output_dir, checkpointed
        super().__init__(self.message())

    def message(self, sweep_dir: str | None = None) -> str:
        """One line: what stopped, and how to resume; ``sweep_dir``: the run was a job of that ``-m``
        sweep, which the signal ended too (its finished jobs are kept and not run again)."""
        name = signal.Signals(self.signum).name
        if sweep_dir is not None:
            resume = f"the same command with hydra.sweep.dir={sweep_dir} resumes the sweep"
        else:
            resume = f"the same command with hydra.run.dir={self.output_dir} resumes it"
        if self.checkpointed:
            kept = f"round {self.last_round} is checkpointed in {self.output_dir}; {resume}"
        elif self.last_round:
            kept = "no checkpoint was kept (simulation.checkpoint_every=0)"
        else:
            kept = "before its first round: nothing to resume" + (f"; {resume}" if sweep_dir else "")
        return f"stopped by {name} after round {self.last_round}; {kept}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM set the yielded ``StopRequest`` instead of raising (main thread only;
    elsewhere, e.g. a run started from a worker thread, signals are left as they are)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    request.rearm()
    try:
        yield request
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
