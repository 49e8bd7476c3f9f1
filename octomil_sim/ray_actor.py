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

Flower's Ray backend passes the function that loads the ClientApp with every message
(``a.run.remote(app_fn, message, cid, context)``), so Ray cloudpickles it, with the ClientApp and the
run's spec its handlers close over (7 KB), in the driver for every message (0.2-0.5 ms holding the
GIL, while the worker threads that submit a round's messages wait for it one after the other) and
unpickles it in the actor (0.1-0.3 ms). ``PickledOnce`` wraps that function: it is pickled once per
run, its bytes travel with each message as they are, and each actor unpickles them on its first
message and then finds the loaded app by the run's key. Measured on 2 cores (``mlr-synthetic11-eval``,
client by client, 400 rounds, three interleaved pairs): a round's median 25.3, 23.9 and 26.6 ms
against 28.9, 28.6 and 27.5 ms; submitting a message 0.3-0.5 ms instead of 0.5-3.5 ms.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from multiprocessing.connection import Client, Connection

import ray
from ray import cloudpickle
from ray.exceptions import ActorDiedError
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError

__all__ = ["ChannelCall", "ClientAppActor", "PickledOnce", "connect", "fetch_pickled", "submit_pickled"]


@ray.remote
class ClientAppActor:
    """Runs a ClientApp on the messages Flower's Ray backend hands it (from its actor pool: any idle
    actor serves the next message, whichever Flower node it is for)."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn:
            on_actor_init_fn()

    def terminate(self) -> None:
        ray.actor.exit_actor()

    def prepare(self, client_app_fn: Callable[[], ClientApp]) -> str | None:
        """Load the ClientApp and run its ``prepare`` (when it has one) before the first message: an
        actor started early (``octomil_sim.local_ray.early_client_actors``) imports the client side
        and builds the run's client runtime while the driver is still busy. An error is returned,
        not raised: the first message meets it again and reports it as every message does."""
        try:
            prepare = getattr(client_app_fn(), "prepare", None)
            if prepare is not None:
                prepare()
        except Exception as ex:  # noqa: BLE001
            return f"{type(ex).__name__}: {ex}"
        return None

    def run(self, client_app_fn: Callable[[], ClientApp], message: Message, cid: str,
            context: Context) -> tuple[str, Message, Context]:
        try:
            out_message = client_app_fn()(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        return cid, out_message, context

    def listen(self, client_app_fn: Callable[[], ClientApp], driver: tuple[str, int]) -> str | None:
        """Open this actor's channel to the driver, ``driver`` = (its Ray node, its process id): a Unix
        socket in Linux's abstract namespace (no file), served by a thread of this actor (``_serve``),
        that carries small messages as ``run_pickled``'s bytes and every reply to them pickled
        (``submit_pickled``, ``ChannelCall``). Returns the socket's address (``connect``), or None for
        an actor on another node than the driver, or off Linux: Ray's tasks carry its messages.
        Why: a Ray task costs some 0.8 ms there and back with a bare actor on 2 cores, and 1.2-1.3 ms
        to reach the actor plus 0.75-0.8 ms back in a run (``mlr-synthetic11``, medians of 900
        messages, two traced runs); the socket took 0.15 ms and 0.4 ms there. Ray still starts, places, counts and ends the actor, and
        carries the large messages (``small``). Ray's own low-latency path (compiled graphs) polls:
        an idle actor kept a whole core busy. The pool sends one message at a time to an actor, so the
        channel's thread never runs beside one of Ray's tasks on this actor. Differences from Ray's
        task: the app runs in the channel's thread, not the actor's main one (thread-local state such
        as torch's grad mode starts afresh there, and ``signal.signal`` cannot be called); an app that
        raises ``SystemExit`` (or another ``BaseException``) fails its message as any app's error,
        where Ray's task would end the actor."""
        node, pid = driver
        if not sys.platform.startswith("linux") or node != ray.get_runtime_context().get_node_id():
            return None
        address = f"\0octomil-{uuid.uuid4().hex}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(8)
        threading.Thread(target=self._serve, args=(listener, pid, client_app_fn), daemon=True,
                         name="octomil-channel").start()
        return address

    def _serve(self, listener: socket.socket, driver_pid: int, client_app_fn: Callable[[], ClientApp]) -> None:
        """``listen``'s thread: take the first connection from the driver's process (the kernel's
        ``SO_PEERCRED``; any other process's is closed unread: an abstract socket has no file
        permissions), say ``READY`` on it (``connect`` waits for that), then answer each message it
        sends (``ChannelCall.result`` reads the answers) until the driver closes it, under Ray's
        process title of a busy actor while a message runs. The sockets block whatever
        ``socket.setdefaulttimeout`` an app set, and a process the app forks closes the channel
        (``os.register_at_fork``): a child that outlived a killed actor would keep the driver from
        seeing the channel close."""
        listener.setblocking(True)
        with listener:
            while True:
                try:
                    sock, _ = listener.accept()
                    sock.setblocking(True)
                    peer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                except OSError:
                    return
                if struct.unpack("3i", peer)[0] == driver_pid:
                    break
                sock.close()
        with Connection(sock.detach()) as conn:
            serving = [True]  # (as the fork found it: a channel closed before the fork is not closed again)

            def close_in_child(fd: int = conn.fileno()) -> None:
                if serving[0]:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

            # a handler per channel, not a module-level one: Ray may ship this class by value, with
            # copies of this module's globals that no module-level registration would see
            os.register_at_fork(after_in_child=close_in_child)
            try:
                conn.send_bytes(READY)
                while True:
                    payload = conn.recv_bytes()
                    conn.send_bytes(self._answer(client_app_fn, payload))
            except (EOFError, OSError):  # (the driver closed the channel)
                return
            finally:
                serving[0] = False

    def _answer(self, client_app_fn: Callable[[], ClientApp], payload: bytes) -> bytes:
        """A message's answer, pickled: ``(None, (cid, reply, context))`` as ``run`` returns it, or
        ``("load", text)`` / ``("app", text)`` for the ``LoadClientAppError`` / ``ClientAppException``
        that ``run`` raises (``ChannelCall.result`` raises them again)."""
        _set_title(f"ray::{type(self).__name__}.run")
        try:
            cid, message, context = pickle.loads(payload)
            out = (None, self.run(client_app_fn, message, cid, context))
        except LoadClientAppError as ex:
            out = ("load", _text(ex))
        except ClientAppException as ex:  # (``run``'s wrapper: the driver wraps the app's own error again)
            out = ("app", _text(ex.__cause__ or ex))
        except BaseException as ex:  # noqa: BLE001 (``SystemExit`` and the like, which ``run`` lets through)
            out = ("app", _text(ex))
        finally:
            _set_title(f"ray::{type(self).__name__}")
        try:
            return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as ex:  # noqa: BLE001 (a reply that does not pickle)
            return pickle.dumps(("app", _text(ex)))

    def run_pickled(self, client_app_fn: Callable[[], ClientApp], payload: bytes):
        """``run`` of a pickled ``(message, cid, context)``, its result pickled when it is small
        (``small``; else as it is, for Ray's serializer): Ray passes bytes as they are, where it
        serialises a Flower ``Message`` and ``Context`` object by object through its own serializer
        (``lean_client_actors``' pool sends this way to an actor without a channel; ``submit_pickled``)."""
        cid, message, context = pickle.loads(payload)
        result = self.run(client_app_fn, message, cid, context)
        return pickled(*result) if small(result[1]) else result


#: messages whose arrays hold fewer bytes travel pickled (``small``): above Ray's own threshold for
#: passing a value inline (100 KB), Ray's serializer moves it through its object store, where pickling
#: it first only adds copies (the CNN's replies, 26 MB a client, ran 8% slower pickled)
PICKLED_BYTES = 64 * 2**10


def small(message: Message) -> bool:
    """Whether ``message``'s arrays hold fewer than ``PICKLED_BYTES`` (one without content, or not a
    Flower ``Message``, is small)."""
    if not isinstance(message, Message) or not message.has_content():
        return True
    return sum(record.count_bytes() for record in message.content.values()
               if isinstance(record, ArrayRecord)) < PICKLED_BYTES


def pickled(cid: str, message: Message, context: Context) -> bytes:
    """A node's id, a message and its context, pickled in the order of ``run``'s result (what
    ``run_pickled`` unpickles, and ``fetch_pickled`` reads back)."""
    return pickle.dumps((cid, message, context), protocol=pickle.HIGHEST_PROTOCOL)


def submit_pickled(client_app_fn: Callable[[], ClientApp], message: Message, cid: str, context: Context):
    """How to send a message to an actor: a function of the actor, and of its channel (``connect``;
    None without one), that sends a small message (``small``) pickled, through the channel when there
    is one, else to the actor's ``run_pickled``, or any other message to its ``run``, as Flower sends
    it, and returns the future of the reply (``fetch_pickled``). Pickled, a packed train message of
    five MLR clients (4 KB down, 15 KB up) took 1.2 ms there and back with a bare actor on 2 cores,
    against 1.8 ms passed as objects. The message is pickled here, before the caller takes an actor."""
    if small(message):
        payload = pickled(cid, message, context)

        def send(actor, channel: Connection | None = None):
            if channel is None:
                return actor.run_pickled.remote(client_app_fn, payload)
            return ChannelCall(channel, payload)

        return send
    return lambda actor, channel=None: actor.run.remote(client_app_fn, message, cid, context)


def fetch_pickled(future) -> tuple[str, Message, Context]:
    """What ``submit_pickled``'s actor returned: ``run``'s ``(cid, reply, context)``."""
    if isinstance(future, ChannelCall):
        return future.result()
    result = ray.get(future)
    return pickle.loads(result) if isinstance(result, bytes) else result


def connect(address: str | None, timeout: float = 30.0) -> Connection | None:
    """The driver's end of an actor's channel, at the address its ``listen`` returned, once the actor
    has said ``READY`` on it (within ``timeout`` seconds). None without an address, and when the
    connection fails or the actor closes it (a driver whose process id the actor does not see as
    its own, in another pid namespace): Ray's tasks then carry its messages."""
    if not address:
        return None
    try:
        conn = Client(address, family="AF_UNIX")
    except Exception:  # noqa: BLE001
        return None
    try:
        if conn.poll(timeout) and conn.recv_bytes() == READY:
            return conn
    except (EOFError, OSError):
        pass
    conn.close()
    return None


#: what an actor's channel says first to the driver's connection it accepted (``connect`` waits for it)
READY = b"ready"

def _text(ex: BaseException) -> str:
    """An exception as ``run`` words it for ``ClientAppException`` (``str``), or, for a ``BaseException``
    such as ``SystemExit``, or one whose ``str`` fails, with its type's name."""
    try:
        return str(ex) if isinstance(ex, Exception) else f"{type(ex).__name__}: {ex}"
    except Exception:  # noqa: BLE001
        return type(ex).__name__


class ChannelCall:
    """A message sent through an actor's channel (``ClientAppActor.listen``): the future of its reply.
    ``result`` returns ``run``'s ``(cid, reply, context)`` or raises what ``run`` raises (the loader's
    ``LoadClientAppError``, an app's error as ``ClientAppException``); a channel that closes (the
    actor died) raises Ray's ``ActorDiedError``, as Ray's task would."""

    def __init__(self, channel: Connection, payload: bytes) -> None:
        self.channel = channel
        try:
            channel.send_bytes(payload)
        except OSError as ex:
            raise ActorDiedError() from ex

    def result(self) -> tuple[str, Message, Context]:
        try:
            error, result = pickle.loads(self.channel.recv_bytes())
        except (EOFError, OSError) as ex:
            raise ActorDiedError() from ex
        if error == "load":
            raise LoadClientAppError(result)
        if error is not None:
            raise ClientAppException(result)
        return result


def _set_title(title: str) -> None:
    """Ray's process title of an actor (``ray::<class>.<method>`` while it runs a task), as Ray sets it."""
    setter = getattr(getattr(ray, "_raylet", None), "setproctitle", None)
    if setter is not None:
        setter(title)


#: in an actor: run key -> the ClientApp loader unpickled from that run's first message
_LOADED: dict[str, Callable[[], ClientApp]] = {}


def _loaded(key: str, payload: bytes) -> Callable[[], ClientApp]:
    """How a ``PickledOnce`` unpickles: the loader already unpickled for ``key``, else ``payload``'s."""
    if key not in _LOADED:
        _LOADED.clear()  # an actor serves one run; a key it has not seen is a new run
        _LOADED[key] = cloudpickle.loads(payload)
    return _LOADED[key]


class PickledOnce:
    """A ClientApp loader (``app_fn``) that pickles once: to ``app_fn``'s cloudpickled bytes under a
    key of its own, which an actor unpickles only the first time it meets that key."""

    def __init__(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn
        self.key = uuid.uuid4().hex
        self.payload = cloudpickle.dumps(app_fn)

    def __call__(self) -> ClientApp:
        return self.app_fn()

    def __reduce__(self):
        return _loaded, (self.key, self.payload)
