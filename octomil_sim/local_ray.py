"""The local Ray node a simulation starts, without its autoscaler monitor.

``ray.init`` on a machine with no running cluster starts a head node with an autoscaler monitor, a
Python process that imports Ray's autoscaler (about 0.3 s of a core while the actors start) and, at
``ray.shutdown``, holds the shutdown for a second: Ray stops the GCS before it, and the monitor's
SIGTERM handler keeps trying to report to the stopped GCS until Ray kills it. A single-node
simulation has nothing to scale; ``ray start --no-monitor`` leaves the monitor out of a head node,
and ``without_autoscaler`` does the same for a node started by ``ray.init``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["without_autoscaler"]


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

