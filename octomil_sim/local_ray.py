"""The local Ray node a simulation starts, without its autoscaler monitor.

``ray.init`` on a machine with no running cluster starts a head node with an autoscaler monitor, a
Python process that imports Ray's autoscaler (about 0.3 s of a core while the actors start) and, at
``ray.shutdown``, holds the shutdown for a second: Ray stops the GCS before it, and the monitor's
SIGTERM handler keeps trying to report to the stopped GCS until Ray kills it. A single-node
simulation has nothing to scale; ``ray start --no-monitor`` leaves the monitor out of a head node,
and ``without_autoscaler`` does the same for a node started by ``ray.init``. ``stop_local_autoscaler``
stops a monitor that was started anyway, before the shutdown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["stop_local_autoscaler", "without_autoscaler"]


@contextmanager
def without_autoscaler() -> Iterator[None]:
    """Head nodes started inside this block (by ``ray.init``) get no autoscaler monitor."""
    from ray._private.node import Node

    start_monitor = Node.start_monitor
    Node.start_monitor = lambda self: None
    try:
        yield
    finally:
        Node.start_monitor = start_monitor


def stop_local_autoscaler() -> None:
    """Kill the autoscaler monitor of the Ray node this process started, if it has one (none when it
    joined a running cluster, or started its node ``without_autoscaler``)."""
    from ray._private import ray_constants, worker

    node = worker._global_node
    for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(5)
