"""The local Ray node a simulation starts, without the head processes a simulation never uses.

``ray.init`` on a machine with no running cluster starts a head node with two Python processes that a
private, single-node simulation has no use for:
- the autoscaler monitor, which imports Ray's autoscaler (about 0.3 s of a core while the actors
  start) and, at ``ray.shutdown``, holds the shutdown for a second: Ray stops the GCS before it, and
  the monitor's SIGTERM handler keeps trying to report to the stopped GCS until Ray kills it. A
  single-node simulation has nothing to scale (``ray start --no-monitor`` leaves it out too);
- the API server (``dashboard.py``), which runs even with ``include_dashboard=False``: Ray then
  starts it without the dashboard's pages, for the job-submission and state APIs (``ray job``,
  ``ray list``) that nothing outside this run can reach on a private instance. Measured on 2 cores:
  68-75 MB of proportional set size and 0.8 s of CPU at start, while the actors import torch.

``lean_head_node`` leaves both out of a head node started by ``ray.init`` inside it. It changes
nothing when ``ray.init`` joins a running cluster (``simulation.ray_address``): that starts no head
processes. What stays: the GCS, the raylet and its two agents (the raylet fate-shares with them), and
the log monitor, which brings the clients' prints and warnings to the driver's terminal. The log
monitor runs as a thread of the driver instead of a process of its own (Ray's ``LogMonitor`` class,
the loop of its ``run``): the same lines reach the terminal, and one Python process importing Ray
(about 50 MB of proportional set size) is not started. It checks the log files ten times a second
when nothing new was written, as Ray's does.

``driver_node_backend`` (``simulation.driver_node``) then has the driver serve one Flower node
itself and the actor pool start one actor fewer: Ray's own processes stay, one torch process goes.

Two imports Ray makes in the processes of a simulation that never use them are left out:
- ``lean_head_node``: while starting a head node, Ray asks whether its dashboard's optional
  dependencies are installed by importing them (aiohttp, OpenCensus, OpenTelemetry, Prometheus). With
  ``include_dashboard=False`` and no API server nothing here serves HTTP, so the answer is taken as no:
  the dashboard agent runs in Ray's own minimal mode (as it does wherever ``ray[default]`` is not
  installed, here too: ``aiohttp_cors`` is missing), and the driver imports none of them (7 MB);
- ``skip_unused_serializers``: every Ray process that serialises (the driver and each actor) registers
  serializers for Arrow tables and Starlette's app state, and so imports pyarrow (which HF
  ``datasets`` installs: about 25 MB of proportional set size a process, shared libraries included)
  and Starlette. No message of a simulation holds either; one would travel by pickle, as any other
  object. A worker builds its serialisation context before it imports an actor's module, so
  ``lean_head_node`` has Ray run it in every worker first (the job's ``worker_process_setup_hook``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["driver_node_backend", "early_client_actors", "lean_client_actors", "lean_head_node", "marked",
           "skip_unused_serializers"]

#: how long a message waiting for the driver's node waits before it looks for a free actor again
WAIT_S = 0.01
#: what Ray's workers run before their first task (``skip_unused_serializers``)
SETUP_HOOK = "octomil_sim.local_ray.skip_unused_serializers"


@contextmanager
def lean_head_node() -> Iterator[None]:
    """Head nodes started inside this block (by ``ray.init``) get no autoscaler monitor and no API
    server, their log monitor runs in this process (``follow_logs``), and their dashboard agent runs
    in Ray's minimal mode without the driver importing the dashboard's dependencies to find that out
    (see the module's docstring). ``Node.start_monitor``, ``Node.start_api_server``,
    ``Node.start_log_monitor`` and ``get_dashboard_dependency_error`` are Ray's private names (Ray
    2.55); an unknown Ray without them starts its head node unchanged. The job ``ray.init`` starts here,
    on a head node of its own or a cluster's, runs ``skip_unused_serializers`` in this process and in
    each of its workers (``SETUP_HOOK``, added to the job's ``runtime_env``)."""
    import ray
    import ray._private.utils as ray_utils
    from ray._private.node import Node

    skip_unused_serializers()
    init = ray.init
    nodes: list = []  # head nodes whose log monitor this process runs (follow_logs)
    log_monitor = getattr(Node, "start_log_monitor", None)
    if log_monitor is not None:
        Node.start_log_monitor = lambda self: nodes.append(self)

    def init_with_hook(*args, runtime_env: dict | None = None, **kwargs):
        return init(*args, runtime_env={"worker_process_setup_hook": SETUP_HOOK, **(runtime_env or {})}, **kwargs)

    saved = {name: getattr(Node, name) for name in ("start_monitor", "start_api_server") if hasattr(Node, name)}
    for name in saved:
        setattr(Node, name, lambda self, *args, **kwargs: None)
    dependency_error = getattr(ray_utils, "get_dashboard_dependency_error", None)
    if dependency_error is not None:
        ray_utils.get_dashboard_dependency_error = \
            lambda: ImportError("a simulation's private Ray instance runs no dashboard (octomil_sim.local_ray)")
    ray.init = init_with_hook
    try:
        yield
    finally:
        ray.init = init
        for name, method in saved.items():
            setattr(Node, name, method)
        if dependency_error is not None:
            ray_utils.get_dashboard_dependency_error = dependency_error
        if log_monitor is not None:
            Node.start_log_monitor = log_monitor
    for node in nodes:  # (only once ray.init has succeeded)
        follow_logs(node, log_monitor)


def follow_logs(node, start_log_monitor: Callable) -> None:
    """Run ``node``'s log monitor (Ray's ``LogMonitor``: it publishes the new lines of the node's worker
    log files, which Ray's driver prints) in a daemon thread of this process, until Ray is shut down.
    Where Ray's class cannot be built here (another Ray), ``start_log_monitor(node)`` starts Ray's
    own process as usual."""
    import ray

    try:
        from ray._private.log_monitor import LogMonitor, is_proc_alive
        from ray._raylet import GcsClient

        monitor = LogMonitor(node.node_ip_address, node.get_logs_dir_path(), GcsClient(address=node.gcs_address),
                             is_proc_alive, gcs_address=node.gcs_address)
    except Exception:  # noqa: BLE001
        start_log_monitor(node)
        return

    def follow() -> None:  # LogMonitor.run's loop, ending with the Ray instance
        updated = 0.0
        try:
            while ray.is_initialized():
                if monitor.should_update_filenames(updated):
                    monitor.update_log_filenames()
                    updated = time.time()
                monitor.open_closed_files()
                if not monitor.check_log_files_and_publish_updates():
                    time.sleep(0.1)
        except Exception:  # noqa: BLE001 -- Ray shut down under it: the run is over
            pass
        finally:
            for info in monitor.open_file_infos:
                if info.file_handle is not None:
                    info.file_handle.close()

    threading.Thread(target=follow, name="ray-log-monitor", daemon=True).start()


def skip_unused_serializers() -> None:
    """This process's Ray serialisation context registers no serializers for Arrow data or
    Starlette's app state, so Ray imports neither pyarrow nor Starlette here (see the module's
    docstring). It must run before the process's first Ray (de)serialisation: ``lean_head_node``
    runs it in the driver before ``ray.init`` and in every worker of the job. The two functions
    replaced are Ray's (Ray 2.55); a Ray without them is left as it is."""
    try:
        from ray._private import arrow_serialization
        from ray.util import serialization_addons
    except ImportError:
        return
    if hasattr(arrow_serialization, "_register_custom_datasets_serializers"):
        arrow_serialization._register_custom_datasets_serializers = lambda context: None
    if hasattr(serialization_addons, "register_starlette_serializer"):
        serialization_addons.register_starlette_serializer = lambda context: None


def driver_node_backend(backend_config: dict) -> Callable:
    """A factory (for ``local_backend.in_process_clients``) of Flower's Ray backend with one more
    worker: the driver's own process (``simulation.driver_node``; ``config.driver_runs_node``).

    Flower's runtime runs as many worker threads as its backend has workers, each taking the next
    message and handing it to ``process_message``. Here the message the grid marks for the driver
    (``batching.for_driver``: one an exchange, ``SimulationGrid(driver_node=True)``) goes to the
    driver's ClientApp (``LocalBackend``: the calling thread, one message at a time), the others to
    a free actor of the pool as before, or, with none free, to whichever of the driver's node and an
    actor is free first; the pool starts one actor fewer than Ray's CPUs hold
    (``lean_client_actors(spare=1)``).
    So a run on a 2-core machine has the driver and one actor where it had two actors: one process
    importing torch and Flower less (about 270 MB of proportional set size), and half of each
    round's messages with no Ray serialisation. Until the pool's early actors have prepared the app
    (``early_client_actors``; ``actors_ready``), the driver's node serves the messages that find it
    free, rather than have them wait for an actor that still imports torch: on 2 cores the driver
    serves the first rounds alone while the actor starts (2.1-2.4 s after the data check), instead of
    waiting for it in round 1. Which process serves a node does not change its
    numbers: the ClientApp is the same, and a client's state lives in the store, its randomness in
    its seeds (the local backend gives the Ray run's numbers, ``tests/test_local_backend.py``).
    While the driver's node trains, its worker thread holds the GIL except inside torch's kernels;
    the other threads only wait for Ray or an actor's channel (``ClientAppActor.listen``)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from octomil_sim.local_backend import LocalBackend

    class DriverNodeBackend(RayBackend):
        def __init__(self, config: dict) -> None:
            super().__init__(config)
            self.local = LocalBackend(config)
            self.local_busy = threading.Lock()
            self.choosing = threading.Lock()  # guards ``in_actors``: messages on the pool's actors now
            self.in_actors = 0

        def build(self, app_fn) -> None:
            super().build(app_fn)
            self.local.build(app_fn)
            if hasattr(self.pool, "drop_dead"):  # an actor that dies (a client's segfault) leaves the pool:
                self.pool.drop_dead = True      # the driver's node serves its share from then on

        @property
        def num_workers(self) -> int:
            return super().num_workers + 1

        def is_worker_idle(self) -> bool:
            return not self.local_busy.locked() or super().is_worker_idle()

        def process_message(self, message, context):
            marked = self.marked(message)
            while True:
                if not marked and self.actors_ready() and self.reserve_actor():
                    try:
                        return super().process_message(message, context)
                    finally:
                        with self.choosing:
                            self.in_actors -= 1
                # marked for the driver, or no actor ready and free: the driver's node, or, for a message
                # not marked, whichever of it and an actor is free first
                if self.local_busy.acquire(timeout=WAIT_S):
                    try:
                        return self.local.process_message(message, context)
                    finally:
                        self.local_busy.release()

        marked = staticmethod(marked)

        def reserve_actor(self) -> bool:
            """Take one of the pool's actors for a message, if one is free."""
            with self.choosing:
                if self.in_actors >= self.pool.num_actors:
                    return False
                self.in_actors += 1
                return True

        def actors_ready(self) -> bool:
            ready = getattr(self.pool, "actors_ready", None)  # (``lean_client_actors``' pool)
            return ready is None or ready()

        def terminate(self) -> None:
            try:
                super().terminate()
            finally:
                self.local.terminate()

    return lambda: DriverNodeBackend(backend_config)


def marked(message) -> bool:
    """Whether a Flower message is the one marked for the driver's own node (``batching.for_driver``)."""
    from octomil_sim.batching import for_driver

    try:
        return for_driver(message.content)
    except (AttributeError, ValueError):  # (no content: Flower's Message raises ValueError)
        return False


def early_client_actors(backend, client_app, spare: int = 0) -> list:
    """The client actors Flower's Ray ``backend`` will want (its pool's size less ``spare``, the
    driver's own node, but at least one; each with its resources), started now and told to
    ``prepare`` ``client_app`` (``ClientAppActor.prepare``: imports, data partitions, model), so that
    this work runs while the driver checks the data and starts Flower's runtime, not in the first
    round. ``lean_client_actors(early, spare)`` hands them to Flower."""
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    from octomil_sim.ray_actor import ClientAppActor, PickledOnce

    try:
        size = max(1, pool_size_from_resources(backend.client_resources) - spare)
    except ValueError:  # no room for one actor: Flower's backend says so when it builds its pool
        return []
    loader = PickledOnce(lambda: client_app)
    actors = EarlyActors(ClientAppActor.options(**backend.client_resources).remote(**backend.actor_kwargs)
                         for _ in range(size))
    actors.prepared = [actor.prepare.remote(loader) for actor in actors]
    return actors


class EarlyActors(list):
    """``early_client_actors``' actors, with ``prepared``: the result of each one's ``prepare``, in order."""

    prepared: list


@contextmanager
def lean_client_actors(early: list | None = None, spare: int = 0) -> Iterator[None]:
    """Flower's Ray backend builds its client actors inside this block from ``octomil_sim.ray_actor``
    (the same actor, without importing ``flwr.simulation`` in every actor), taking the ``early``
    ones first (``early_client_actors``), and sends them its ClientApp loader pickled once
    (``PickledOnce``; see that module), each small message and reply pickled to bytes (``submit_pickled``),
    through the actor's channel once it has opened one (``ClientAppActor.listen``, asked of every actor
    the pool holds once it is built; only an actor on this machine's Ray node is connected), else as
    Ray's task. An actor that fails a message as dead (Ray's ``RayActorError``, or its channel closing)
    has its channel closed. Its pool holds ``spare`` actors fewer than Ray's resources
    fit, but at least one (``driver_node_backend``: the driver serves one node). Early actors its
    pool did not take end once it is built (or with the block). The pool's ``actors_ready`` says
    whether the early actors it took have prepared the app (``driver_node_backend`` reads it)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from octomil_sim.ray_actor import ClientAppActor, PickledOnce, connect, fetch_pickled, submit_pickled

    prepared = list(getattr(early, "prepared", None) or [None] * len(early or []))
    early = list(early or [])
    flower_actor, flower_build, flower_pool = raybackend.ClientAppActor, raybackend.RayBackend.build, raybackend.BasicActorPool

    class Pool(flower_pool):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.actors_capacity = max(1, self.actors_capacity - spare)
            self.preparing: list = []  # the ``prepare`` results of the early actors taken, until all are in
            self.drop_dead = False  # set by ``driver_node_backend``: a dead actor leaves the pool
            self.listening: dict = {}  # actor -> its ``listen`` result, until its channel is connected
            self.channels: dict = {}  # actor -> the driver's end of its channel (``ray_actor.connect``)

        def add_actors_to_pool(self, num_actors: int) -> None:
            taken = early[:num_actors]
            self.preparing += [ref for ref in prepared[:num_actors] if ref is not None]
            del early[:num_actors], prepared[:num_actors]
            self.pool.extend(taken)
            self.num_actors += len(taken)
            super().add_actors_to_pool(num_actors - len(taken))

        def listen(self, app_fn) -> None:
            """Ask each actor of the pool to open its channel to this process (``ClientAppActor.listen``;
            after its ``prepare``: an actor runs its tasks in order); ``channel`` connects once it has.
            (Actors that join the pool later, none in Flower 1.42's backend, would go without one.)"""
            driver = ray.get_runtime_context().get_node_id(), os.getpid()
            for actor in self.pool:
                self.listening.setdefault(actor, actor.listen.remote(app_fn, driver))

        def channel(self, actor):
            """``actor``'s channel, connected as soon as its ``listen`` has returned; None until then, and
            for an actor on another machine (its messages then go as Ray's tasks)."""
            ref = self.listening.get(actor)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                del self.listening[actor]
                try:
                    address = ray.get(ref)
                except ray.exceptions.RayError:  # (a dead actor: its next Ray task says so)
                    address = None
                if (conn := connect(address)) is not None:
                    self.channels[actor] = conn
            return self.channels.get(actor)

        def forget(self, actor, put_back: bool) -> None:
            """``actor`` failed a message as dead (Ray's ``RayActorError``; its channel closed): its channel
            is closed, and with ``drop_dead`` it leaves the pool (killed, should only its channel have
            died); otherwise it stays, and Ray's tasks carry its messages, as in Flower's pool: it goes
            back to the pool here if ``put_back`` (Flower's handler puts back an actor whose future the
            pool still holds)."""
            conn = self.channels.pop(actor, None)
            self.listening.pop(actor, None)
            if conn is not None:
                conn.close()
            if self.drop_dead:
                self.num_actors -= 1
                ray.kill(actor)
            elif put_back:
                self.pool.append(actor)

        def submit(self, actor_fn, job):  # Flower's, a small message pickled (ray_actor.submit_pickled)
            send = submit_pickled(*job)  # (pickled before an actor leaves the pool: one that fails keeps it)
            actor = self.pool.pop()  # (one atomic step: another worker thread may submit at the same time)
            try:
                future = send(actor, self.channel(actor))
            except ray.exceptions.RayActorError:  # its channel closed as the message went
                self.forget(actor, put_back=True)
                raise
            except BaseException:  # (any other error before the message left: the actor stays in the pool)
                self.pool.append(actor)
                raise
            self._future_to_actor[future] = actor
            return future

        def fetch_result_and_return_actor_to_pool(self, future):  # Flower's, for a pickled reply
            try:
                _, reply, context = fetch_pickled(future)
            except ray.exceptions.RayActorError:
                if self.drop_dead:  # a dead actor leaves the pool; its message's clients failed once
                    self.forget(self._future_to_actor.pop(future), put_back=False)
                elif future in self._future_to_actor:
                    self.forget(self._future_to_actor[future], put_back=False)
                raise
            self.add_actor_back_to_pool(future)
            return reply, context

        def add_actor_back_to_pool(self, future) -> None:  # (Flower's handler of the error calls it too)
            actor = self._future_to_actor.pop(future, None)
            if actor is not None:  # (None: it died, and left the pool above)
                self.pool.append(actor)

        def terminate_all_actors(self) -> None:
            for conn in self.channels.values():  # (an actor's channel thread ends with its connection)
                conn.close()
            self.channels.clear()
            super().terminate_all_actors()

        def actors_ready(self) -> bool:
            """Whether every early actor taken has prepared the app (its ``prepare`` returned, with an
            error or not: its messages meet that error as before); actors Flower starts count as ready."""
            preparing = self.preparing
            if preparing:
                done, _ = ray.wait(preparing, num_returns=len(preparing), timeout=0)
                self.preparing = preparing = [ref for ref in preparing if ref not in done]
            return not preparing

    def build(self, app_fn) -> None:
        loader = PickledOnce(app_fn)
        flower_build(self, loader)
        while early:  # more than the pool took (a cluster that shrank since): their resources go back now
            ray.kill(early.pop())
        self.pool.listen(loader)

    raybackend.ClientAppActor, raybackend.RayBackend.build, raybackend.BasicActorPool = ClientAppActor, build, Pool
    try:
        yield
    finally:
        raybackend.ClientAppActor, raybackend.RayBackend.build, raybackend.BasicActorPool = \
            flower_actor, flower_build, flower_pool
        if early and ray.is_initialized():
            for actor in early:
                ray.kill(actor)
