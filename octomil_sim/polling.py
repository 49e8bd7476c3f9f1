"""Shorter waits in Flower's simulation runtime, so that a round costs its compute and not a polling period.

Flower's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) moves messages between the
ServerApp and the ClientApp actors with three kinds of thread, all polling:
- ``add_messages_to_queue`` scans the LinkState for new messages, then sleeps 0.1 s: every exchange
  waits 50 ms on average before any client starts, whatever the round computes;
- the worker threads and ``put_message_into_state`` read their queues with a 1 s timeout only to
  look at the stop event: the run's end waits for them, up to a second each;
- the ServerApp's ``InMemoryGrid`` pulls replies every 0.1 s (``SimulationGrid`` sets its own interval).

``prompt_simulation_runtime`` runs a simulation with the same functions and no polling period: the
grid's push sets ``PUSHED``, on which the scan waits (it still rescans every ``stop_check`` seconds
for its stop event, or after four times its own duration when scanning many nodes is slow, so it
never takes more than a fifth of a core); the thread that stores replies sets ``REPLIED`` after each,
on which ``SimulationGrid`` waits instead of sleeping between pulls; the queue reads check the stop
event every ``stop_check`` seconds. A scan queues the message marked for the driver's own node
(``local_ray.marked``) after the others: an actor's message is sent before the driver's node starts
training and holds the GIL. Nothing else changes: the same threads, queues, LinkState and
backend. Waiting on an event instead of waking every few milliseconds matters most when the clients
run in the driver's process (``simulation.backend=local``): each wake-up of a polling thread takes
the GIL from the thread that trains.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["prompt_simulation_runtime"]


#: set by ``SimulationGrid.push_messages`` (new messages in the LinkState) and by the thread that
#: stores replies in it (``REPLIED``); the waiting threads clear them before they look
PUSHED = threading.Event()
REPLIED = threading.Event()


@contextmanager
def prompt_simulation_runtime(stop_check: float = 0.05) -> Iterator[None]:
    # imported here: Flower's runtime imports alembic, whose plugins log at import, and the runner
    # quiets those loggers (``runner._runtime_environment``) only when a run starts
    from flwr.server.superlink.fleet.vce import vce_api

    from octomil_sim.local_ray import marked

    class StopCheckingQueue(queue.Queue):
        """A queue whose timed reads wait at most ``stop_check``: the callers loop and re-check their stop event."""

        def get(self, block: bool = True, timeout: float | None = None):
            return super().get(block, None if timeout is None else min(timeout, stop_check))

    def add_messages_to_queue(state, messages: queue.Queue, nodes_mapping, f_stop: threading.Event) -> None:
        """``vce_api.add_messages_to_queue``, scanning when messages were pushed instead of every 0.1 s."""
        while not f_stop.is_set():
            PUSHED.clear()
            started = time.perf_counter()
            held = []  # the message the driver's own node serves goes last (``local_ray.marked``)
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    if marked(msg):
                        held.append(msg)
                    else:
                        messages.put(msg)
            for msg in held:
                messages.put(msg)
            pause = 4 * (time.perf_counter() - started)
            if pause > 0.001:  # a slow scan (many nodes): never more than a fifth of a core
                f_stop.wait(pause)
            PUSHED.wait(stop_check)

    def put_message_into_state(state, replies: queue.Queue, f_stop: threading.Event) -> None:
        """``vce_api.put_message_into_state``, announcing each stored reply (``REPLIED``)."""
        while not f_stop.is_set():
            try:
                reply = replies.get(timeout=stop_check)
            except queue.Empty:
                continue
            state.store_message_res(reply)
            REPLIED.set()

    saved = vce_api.add_messages_to_queue, vce_api.put_message_into_state, vce_api.Queue
    vce_api.add_messages_to_queue, vce_api.put_message_into_state = add_messages_to_queue, put_message_into_state
    vce_api.Queue = StopCheckingQueue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.put_message_into_state, vce_api.Queue = saved
