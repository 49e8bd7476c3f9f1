"""Shorter waits in Flower's simulation runtime, so that a round costs its compute and not a polling period.

Flower's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) moves messages between the
ServerApp and the ClientApp actors with three kinds of thread, all polling:
- ``add_messages_to_queue`` scans the LinkState for new messages, then sleeps 0.1 s: every exchange
  waits 50 ms on average before any client starts, whatever the round computes;
- the worker threads and ``put_message_into_state`` read their queues with a 1 s timeout only to
  look at the stop event: the run's end waits for them, up to a second each;
- the ServerApp's ``InMemoryGrid`` pulls replies every 0.1 s (``SimulationGrid`` sets its own interval).

``prompt_simulation_runtime`` runs a simulation with the same functions and shorter waits: the scan
repeats after ``scan_interval`` (or four times its own duration, when scanning many nodes is slow, so
it never takes more than a fifth of a core) and the queue reads check the stop event every
``stop_check`` seconds. Nothing else changes: the same threads, queues, LinkState and Ray backend.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.server.superlink.fleet.vce import vce_api

__all__ = ["prompt_simulation_runtime"]


@contextmanager
def prompt_simulation_runtime(scan_interval: float = 0.002, stop_check: float = 0.05) -> Iterator[None]:
    class StopCheckingQueue(queue.Queue):
        """A queue whose timed reads wait at most ``stop_check``: the callers loop and re-check their stop event."""

        def get(self, block: bool = True, timeout: float | None = None):
            return super().get(block, None if timeout is None else min(timeout, stop_check))

    def add_messages_to_queue(state, messages: queue.Queue, nodes_mapping, f_stop: threading.Event) -> None:
        """``vce_api.add_messages_to_queue`` with an adaptive pause instead of 0.1 s."""
        while not f_stop.is_set():
            started = time.perf_counter()
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    messages.put(msg)
            f_stop.wait(max(scan_interval, 4 * (time.perf_counter() - started)))

    saved = vce_api.add_messages_to_queue, vce_api.Queue
    vce_api.add_messages_to_queue, vce_api.Queue = add_messages_to_queue, StopCheckingQueue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.Queue = saved
