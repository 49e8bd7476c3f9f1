"""The Ray actor that runs the ClientApp, importing only Flower's client side.

Flower's ``ClientAppActor`` lives in ``flwr.simulation.ray_transport.ray_actor``; a Ray worker that
unpickles it imports the package ``flwr.simulation`` first, whose ``__init__`` imports the whole
simulation and SuperLink side (FastAPI, SQLAlchemy with its PostgreSQL dialect, Alembic, pydantic):
0.65-0.9 s of a core in every client actor (``PYTHONPROFILEIMPORTTIME=1`` in the actors' logs, Ray's
session folder), while the actors start in a run's first round. This module holds the same actor with
the same ``run`` (Flower 1.42's ``VirtualClientEngineActor.run``: load the app, handle the message, wrap
an app's exception in ``ClientAppException``) and ``terminate`` (without Flower's "Manually
terminating" warning, noise at every normal end), and needs only ``flwr.app`` and
``flwr.clientapp``. ``lean_client_actors`` (``octomil_sim.local_ray``) makes Flower's Ray backend build
its actor pool from it. The class keeps Flower's name: ``runner.client_actors_started`` counts actors by it.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError

__all__ = ["ClientAppActor"]


@ray.remote
class ClientAppActor:
    """Runs a ClientApp on the messages Flower's Ray backend hands it (from its actor pool: any idle
    actor serves the next message, whichever Flower node it is for)."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn:
            on_actor_init_fn()

    def terminate(self) -> None:
        ray.actor.exit_actor()

    def run(self, client_app_fn: Callable[[], ClientApp], message: Message, cid: str,
            context: Context) -> tuple[str, Message, Context]:
        try:
            out_message = client_app_fn()(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        return cid, out_message, context
