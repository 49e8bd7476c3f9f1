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
the log monitor, which brings the clients' prints and warnings to the driver's terminal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["lean_client_actors", "lean_head_node"]


@contextmanager
def lean_head_node() -> Iterator[None]:
    """Head nodes started inside this block (by ``ray.init``) get no autoscaler monitor and no API
    server. ``Node.start_monitor`` and ``Node.start_api_server`` are Ray's private methods (Ray 2.55);
    an unknown Ray without them starts its head node unchanged."""
    from ray._private.node import Node

    saved = {name: getattr(Node, name) for name in ("start_monitor", "start_api_server") if hasattr(Node, name)}
    for name in saved:
        setattr(Node, name, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


@contextmanager
def lean_client_actors() -> Iterator[None]:
    """Flower's Ray backend builds its client actors inside this block from ``octomil_sim.ray_actor``
    (the same actor, without importing ``flwr.simulation`` in every actor) and sends them its ClientApp
    loader pickled once (``PickledOnce``; see that module)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from octomil_sim.ray_actor import ClientAppActor, PickledOnce

    flower_actor, flower_build = raybackend.ClientAppActor, raybackend.RayBackend.build

    def build(self, app_fn) -> None:
        flower_build(self, PickledOnce(app_fn))

    raybackend.ClientAppActor, raybackend.RayBackend.build = ClientAppActor, build
    try:
        yield
    finally:
        raybackend.ClientAppActor, raybackend.RayBackend.build = flower_actor, flower_build
