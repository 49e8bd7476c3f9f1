"""Flower's simulation runtime with the ClientApp in the driver's own process (``simulation.backend=local``).

Flower 1.42's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) hands every message
to a ``Backend``; ``start_vce`` always builds the ``RayBackend``, which starts a Ray instance and runs
the ClientApp in Ray actors (separate processes, each importing torch and Flower and holding its
clients' data). ``LocalBackend`` implements the same ``Backend`` interface and calls the ClientApp
in the process that runs the ServerApp, one message at a time: the same ServerApp, strategy, Grid,
LinkState, messages and ClientApp, with no Ray processes, no actor start-up and no serialisation
between processes. It suits a run on one machine whose clients would not keep several cores busy
(small cohorts, small models) and single-core machines; a run that needs several cores or a cluster
stays on Ray (``simulation.backend=ray``).

``in_process_clients`` makes ``start_vce`` use it for the runs started inside the block (it replaces
``vce_api.run_api``'s backend factory, the one place the runtime names a backend). The ClientApp
process state (``client_app.client_runtime``'s cache: the client-state store, the memory store's
contents; the decoded received model) is cleared before and after each run, as a Ray actor's would be
gone, the data cache after it, and torch's thread count and float modes (TF32, cuDNN) are restored. One such block at a time per
process, and no Ray run beside it (the runner refuses both).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from octomil_sim.client_app import CLIENT_THREADS, float_modes

__all__ = ["LocalBackend", "in_process_clients", "local_run_active"]


class LocalBackend(Backend):
    """A ``Backend`` with one worker: the calling thread runs the ClientApp (as
    ``ClientAppActor.run`` does in an actor, with the same exception wrapping). torch's thread count
    is the driver's outside ``process_message`` and what the ClientApp sets inside it (one thread a
    client), as a Ray driver's and its actors' are: torch splits large reductions by thread count, so
    the server's arithmetic (e.g. the norms of q-FFL or of DP clipping) gives the Ray run's numbers."""

    def __init__(self, backend_config: BackendConfig | None = None) -> None:
        super().__init__(backend_config or {})
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise ValueError("LocalBackend.build() was not called")
        threads = torch.get_num_threads()  # the ServerApp's (the driver's) torch threads, as on Ray ...
        torch.set_num_threads(CLIENT_THREADS)  # ... and a Ray actor's while the ClientApp runs
        try:
            return self.app_fn()(message=message, context=context), context
        except LoadClientAppError:
            raise
        except BaseException as ex:  # as ClientAppActor.run: the runtime turns it into an error reply. Also
            # SystemExit (sys.exit in client code): Flower's worker thread catches only Exception, and
            # would die with the run waiting for a reply for ever (on Ray the actor dies, and replies)
            raise ClientAppException(str(ex)) from ex
        finally:
            torch.set_num_threads(threads)


_active = threading.Lock()  # held by the one run in this process whose clients run here


def local_run_active() -> bool:
    """Whether a run with the local backend is running in this process (``in_process_clients``)."""
    return _active.locked()


@contextmanager
def in_process_clients(make_backend: Callable[[], Backend] = LocalBackend) -> Iterator[None]:
    """Simulations started in this block run their ClientApp in this process (``LocalBackend``), or
    some of it (``make_backend``: ``local_ray.driver_node_backend``'s, the driver's node beside Ray
    actors). One such run at a time per process (the block changes process-wide state); a second
    one, e.g. from another thread, is refused."""
    from octomil_sim.client_app import client_runtime, forget_received
    from octomil_sim.data import forget_data

    if not _active.acquire(blocking=False):
        raise RuntimeError("simulation.backend=local: another run with the local backend is running in this "
                           "process; run them one after the other, or in separate processes (--jobs)")
    run_api = vce_api.run_api

    def local_run_api(app_fn, backend_fn, *args, **kwargs):
        return run_api(app_fn, make_backend, *args, **kwargs)

    threads = torch.get_num_threads()
    modes = float_modes()  # a GPU client runtime sets them for its process: this one is the caller's
    client_runtime.cache_clear()
    vce_api.run_api = local_run_api
    try:
        yield
    finally:
        vce_api.run_api = run_api
        client_runtime.cache_clear()  # a later run (same spec) starts from nothing, as with fresh actors
        forget_received()
        forget_data()  # a later run opens its data again (its files may have changed)
        torch.set_num_threads(threads)
        float_modes(modes)
        _active.release()
