"""Ends the processes of a run's private Ray instance when the driver dies without shutting Ray down.

``ray.init`` starts the GCS and the raylet as children of the driver that die with it (Ray's
fate-sharing, ``PR_SET_PDEATHSIG``), and the raylet starts the workers and two agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``). After a ``kill -9`` of the driver the agents
notice the raylet is gone but then wait in ``publish_error_to_driver`` (Ray's
``_private/process_watcher.py``: a 60 s call to the GCS, which died with the driver) and stay behind,
reparented to init, for one to two minutes (measured: 2 min on 2 cores, Ray 2.55).

``Reaper`` is a small process started by the driver once Ray runs. It keeps a list of the driver's
descendants (pid and start time, refreshed every ``interval`` seconds) and holds the read end of a
pipe whose write end only the driver holds. When the pipe ends without the driver's "done" byte (the
driver died: kill -9, a crash, ``os._exit`` after a second Ctrl-C), it waits ``grace`` seconds for
Ray's own fate-sharing, then SIGKILLs every listed process that still runs (the same pid *and* start
time, so a reused pid is never hit). A driver that ends normally writes "done" first, and nothing is
killed. Only processes that descend from the driver are ever listed, never one found by its name;
but all of them are, Ray's or not (e.g. W&B's service process, or a notebook kernel's other children
when a run is started from one): a driver that dies takes its whole process tree with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Reaper", "descendants"]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int, exclude: int | None = None) -> dict[int, str]:
    """``{pid: start time}`` of every live descendant of ``pid`` (Linux /proc), without ``exclude``
    and its own descendants."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            start[int(entry.name)] = fields[19]
    out: dict[int, str] = {}
    todo = [p for p in children.get(pid, []) if p != exclude]
    while todo:
        p = todo.pop()
        out[p] = start[p]
        todo += [c for c in children.get(p, []) if c != exclude]
    return out


def still_running(processes: dict[int, str]) -> list[int]:
    """The listed processes that still run: same pid and start time, not a zombie."""
    return [pid for pid, started in processes.items()
            if (fields := _stat(pid)) is not None and fields[19] == started and fields[0] != "Z"]


class Reaper:
    """The driver's side: starts the watching process and tells it, at a normal end, to kill nothing.
    Off where /proc is missing (not Linux): there the agents time out on their own."""

    def __init__(self, interval: float = 1.0, grace: float = 3.0):
        self.process: subprocess.Popen | None = None
        if not Path("/proc/self/stat").exists():
            return
        read, self._write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "octomil_sim.reaper", str(os.getpid()), str(read), str(interval), str(grace)],
            pass_fds=(read,), stdin=subprocess.DEVNULL, start_new_session=True,  # no terminal Ctrl-C reaches it
        )
        os.close(read)

    def done(self) -> None:
        """The driver shut Ray down itself: the watcher exits without killing anything."""
        if self.process is None:
            return
        try:
            os.write(self._write, b"done")
            os.close(self._write)
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process = None


def watch(driver: int, read_fd: int, interval: float, grace: float) -> None:
    """The watching process: list the driver's descendants until the pipe ends; kill what is left of
    them unless the driver said "done"."""
    import selectors

    me, listed = os.getpid(), {}
    selector = selectors.DefaultSelector()
    selector.register(read_fd, selectors.EVENT_READ)
    while True:
        listed.update(descendants(driver, exclude=me))
        if selector.select(timeout=interval):
            said = os.read(read_fd, 16)
            if said:  # "done" (then the pipe closes): a normal end
                return
            break  # end of file without "done": the driver died
    time.sleep(grace)
    for pid in still_running(listed):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
