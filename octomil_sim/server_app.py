"""The ServerApp: runs the configured Flower strategy round by round, then evaluates every client.

``SimulationGrid`` wraps Flower's Grid and is what makes thousands of clients cheap while every
strategy stays a plain Flower ``Strategy`` that addresses one message per client:
- the strategy sees ``num_clients`` nodes, ids ``0..num_clients-1`` (the client ids);
- a round's messages are packed into one message per Flower node (``octomil_sim.batching``; one
  node per Ray actor), and each node's packed reply is unpacked into one reply per client, so Flower's
  per-message and per-node costs are paid per actor, not per client;
- it counts the bytes each client's message carries down and up, as a real federation would send them;
- it returns replies in client order, so aggregation sums in the same order in every run;
- it applies the system model's round deadline: a straggler's reply never reaches the strategy.
- it can carry a round's evaluation and the next round's training in one exchange
  (``evaluate_then_train``, used by ``run_rounds``), with the numbers of two.

``SeededSampling`` makes a strategy's client sampling a function of (seed, round).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

import numpy as np

from octomil_sim.batching import pack, pack_pair, split_by_work, split_even, unpack, unpack_pair
from octomil_sim.errors import ConfigError, RunError
from octomil_sim.metrics import client_rows
from octomil_sim.polling import PUSHED, REPLIED

NODE_TIMEOUT_S = 300.0  # seconds for all Flower nodes to register with the grid
STARTUP_TIMEOUT_S = 300.0  # seconds the first exchange may wait with no client actor started


#: the message type of ``SimulationGrid.evaluate_then_train`` (a custom train action, as Flower names them)
EVALUATE_THEN_TRAIN = f"{MessageType.TRAIN}.evaluate_first"


def _one_kind(messages: list[Message]) -> str:
    kinds = {m.metadata.message_type for m in messages}
    if len(kinds) > 1:
        raise ValueError(f"one message type per exchange, got {sorted(kinds)}")
    return kinds.pop()


def _ids(chunk: list[Message]) -> list[int]:
    return [m.metadata.dst_node_id for m in chunk]


def _reason(reply: Message | None) -> str:
    return "no reply from its node" if reply is None else reply.error.reason


def content_bytes(content: RecordDict) -> int:
    """Bytes of model arrays a message carries (Flower's serialized ``ArrayRecord`` size)."""
    return sum(record.count_bytes() for record in content.values() if isinstance(record, ArrayRecord))


class SimulationGrid(Grid):
    """Flower's Grid seen as a federation of ``num_clients`` clients hosted on a few Flower nodes."""

    def __init__(self, grid: Grid, num_clients: int, deadline: float | None = None, pull_interval: float = 0.05,
                 actors_started: Callable[[], int | None] = lambda: None, startup_timeout: float = STARTUP_TIMEOUT_S,
                 unseen: Iterable[int] = (), driver_node: bool = False):
        self._grid = grid
        self.driver_node = driver_node  # the driver serves a node itself (``evaluate_then_train``)
        self.num_clients, self.deadline = num_clients, deadline
        self.unseen = frozenset(unseen)  # held-out clients: never trained, evaluated only at the end
        self.actors_started, self.startup_timeout = actors_started, startup_timeout
        self.pull_interval = pull_interval
        self.exchanges = 0  # exchanges so far (``run_rounds`` checks that ``configure_train`` makes none)
        self.answered = False  # whether any node has replied yet
        self.nodes: list[int] = []
        self.bytes: Counter[str] = Counter()
        self.failed: Counter[int] = Counter()  # client -> rounds it failed in (dropout or error)
        self.straggled: Counter[int] = Counter()  # client -> rounds its reply missed the deadline
        self.last_failure: dict[int, str] = {}
        self.work: dict[int, float] = {}  # client -> local steps of its last training (balances the nodes)

    # --- delegation -------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = self._grid.push_messages(messages)
        PUSHED.set()  # the runtime's scan waits for it (``octomil_sim.polling``)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    # --- what this wrapper adds ---------------------------------------------------------------
    def wait_for_nodes(self, num_nodes: int, timeout: float = NODE_TIMEOUT_S,
                       should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``num_nodes`` Flower nodes have registered; False if asked to stop first. A run
        whose nodes do not all register within ``timeout`` seconds stops with ``RunError``. This does
        not catch client actors that never start: Flower registers its nodes before Ray starts them."""
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(self._grid.get_node_ids())) < num_nodes:
            if should_stop():
                return False
            if time.monotonic() > deadline:
                raise RunError(f"only {len(nodes)} of {num_nodes} Flower nodes registered within {timeout:.0f} s; "
                               "Ray could not start the client actors (too little memory or CPU for "
                               "simulation.num_cpus_per_client?); run again, or lower simulation.num_nodes")
            time.sleep(0.05)
        self.nodes = nodes
        return True

    def get_node_ids(self) -> list[int]:
        """The clients the strategy may sample: all but the held-out ``unseen`` ones."""
        return [c for c in range(self.num_clients) if c not in self.unseen]

    def all_clients(self) -> list[int]:
        return list(range(self.num_clients))

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's ``Grid.send_and_receive`` (push, then pull until every reply is in or ``timeout``),
        which also stops a run that waits for ever: until the first reply of the run arrives, every
        ``startup_timeout`` seconds it asks ``actors_started()`` how many client actors run, and with
        none a ``RunError`` ends the run. Flower registers its nodes before Ray starts the actors that
        serve them (``wait_for_nodes`` cannot see this), and ``ray.get`` on an actor that never starts
        waits without limit; ``actors_started`` returning None (unknown) keeps waiting."""
        self.exchanges += 1
        REPLIED.clear()
        waiting = set(self.push_messages(messages))
        now = time.monotonic()
        end = None if timeout is None else now + timeout
        check = now + self.startup_timeout
        out: list[Message] = []
        while waiting:
            REPLIED.clear()  # set again by every reply stored from now on
            got = list(self._grid.pull_messages(waiting))
            out += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            self.answered = self.answered or bool(got)
            now = time.monotonic()
            if not waiting or (end is not None and now > end):
                break
            if not self.answered and now > check:
                if self.actors_started() == 0:
                    raise RunError(f"Ray started none of the client actors within {self.startup_timeout:.0f} s "
                                   "of the first round (their resources: simulation.num_cpus_per_client, "
                                   "num_gpus_per_client); see the raylet log in Ray's session folder "
                                   "(/tmp/ray/session_latest/logs); allowed: simulation.startup_timeout_s > 0")
                check = now + self.startup_timeout
            REPLIED.wait(self.pull_interval)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        if not messages:
            return []
        kind = _one_kind(messages)
        direction = kind.split(".")[0]
        self._count_down(direction, messages)
        chunks = self._chunks(direction, messages)
        here = self._driver_chunk(chunks if direction == "train" else [[]] * len(chunks))
        packed = [Message(content=pack([(m.metadata.dst_node_id, m.content) for m in chunk], driver=i == here),
                          message_type=kind, dst_node_id=node) for i, (node, chunk) in enumerate(zip(self.nodes, chunks))]
        replies = {r.metadata.reply_to_message_id: r for r in self._exchange(packed, timeout)}
        outcomes = []
        for sent, chunk in zip(packed, chunks):
            reply = replies.get(sent.metadata.message_id)
            if reply is None or reply.has_error():
                outcomes.append((chunk, {}, dict.fromkeys(_ids(chunk), _reason(reply))))
            else:
                outcomes.append((chunk, *unpack(reply.content)))
        return self._collect(direction, outcomes)

    def evaluate_then_train(self, evaluate: Iterable[Message], train: Iterable[Message], *,
                            timeout: float | None = None) -> tuple[list[Message], Callable[[], list[Message]]]:
        """One exchange that carries an evaluation and the next round's training (``run_rounds``):
        each node evaluates its share of the ``evaluate`` clients, then trains its share of ``train``.
        The training clients go to the nodes ``send_and_receive`` would give them; an evaluated
        client that also trains goes to its training node, so its evaluation reads its state before
        its training writes it, as in two exchanges; the other evaluated clients then fill the nodes
        with the fewest; when the driver serves a node itself (``driver_node``), the message marked for
        the driver (``_driver_chunk``, ``batching.for_driver``) first takes up to twice an even share
        of them (on two nodes, all): on Ray an actor's message costs about 0.5 ms of transport more
        on 2 cores (its channel, ``ray_actor.ClientAppActor.listen``; 2 ms as Ray's tasks), and the
        two messages then end about together (traced: the driver's last in 528 of 1,008 exchanges of
        ``mlr-synthetic11-eval``). Which node
        evaluates a client changes none of its numbers. Returns the evaluation's replies and a function that returns the training's: the
        training's bytes, failures and stragglers are counted only when it is called, so that the
        evaluated round's numbers (``RunSession.after_round``) do not include the next round's."""
        evaluate = sorted(evaluate, key=lambda m: m.metadata.dst_node_id)
        train = sorted(train, key=lambda m: m.metadata.dst_node_id)
        if not evaluate or not train or _one_kind(evaluate) != MessageType.EVALUATE \
                or _one_kind(train) != MessageType.TRAIN:
            raise ValueError("evaluate_then_train takes evaluate messages, then train messages")
        self._count_down("evaluate", evaluate)
        train_chunks = self._chunks("train", train)
        on_node = {m.metadata.dst_node_id: i for i, chunk in enumerate(train_chunks) for m in chunk}
        evaluate_chunks: list[list[Message]] = [[] for _ in self.nodes[:max(len(train_chunks), len(evaluate))]]
        rest = []
        for m in evaluate:
            node = on_node.get(m.metadata.dst_node_id)
            (rest.append(m) if node is None else evaluate_chunks[node].append(m))
        here = self._driver_chunk(train_chunks + [[]] * (len(evaluate_chunks) - len(train_chunks)))
        if here is not None:  # the driver's message first takes up to twice an even share of the rest
            share = -(-2 * len(rest) // len(evaluate_chunks))
            evaluate_chunks[here] += rest[:share]
            rest = rest[share:]
        for m in rest:  # (in client order: the fill is deterministic)
            min(evaluate_chunks, key=len).append(m)  # (the first of the emptiest)
        for chunk in evaluate_chunks:
            chunk.sort(key=lambda m: m.metadata.dst_node_id)
        train_chunks += [[] for _ in range(len(evaluate_chunks) - len(train_chunks))]
        pairs = [(node, e, t, i == here)
                 for i, (node, e, t) in enumerate(zip(self.nodes, evaluate_chunks, train_chunks)) if e or t]
        packed = [Message(content=pack_pair([(m.metadata.dst_node_id, m.content) for m in e],
                                            [(m.metadata.dst_node_id, m.content) for m in t], driver=marked),
                          message_type=EVALUATE_THEN_TRAIN, dst_node_id=node) for node, e, t, marked in pairs]
        replies = {r.metadata.reply_to_message_id: r for r in self._exchange(packed, timeout)}
        evaluated, trained = [], []
        for sent, (_, e, t, _) in zip(packed, pairs):
            reply = replies.get(sent.metadata.message_id)
            if reply is None or reply.has_error():
                reason = _reason(reply)
                evaluated.append((e, {}, dict.fromkeys(_ids(e), reason)))
                trained.append((t, {}, dict.fromkeys(_ids(t), reason)))
            else:
                (e_contents, e_failures), (t_contents, t_failures) = unpack_pair(reply.content)
                evaluated.append((e, e_contents, e_failures))
                trained.append((t, t_contents, t_failures))

        def training() -> list[Message]:
            self._count_down("train", train)
            return self._collect("train", trained)

        return self._collect("evaluate", evaluated), training

    def _driver_chunk(self, train_chunks: list[list[Message]]) -> int | None:
        """Which chunk the driver's own node serves (``driver_node``; None without it): the one with the
        most expected training work (``_work_estimate``; the first of them). The others go to Ray's
        actors, whose messages cost some transport more each (about 0.5 ms on 2 cores through an
        actor's channel, 2 ms as Ray's tasks), so the heaviest share runs where there is none (a chunk
        alone runs there too)."""
        if not self.driver_node or not train_chunks:
            return None
        work = self._work_estimate()
        loads = [sum(work(m) for m in chunk) for chunk in train_chunks]
        return loads.index(max(loads))

    def _count_down(self, direction: str, messages: list[Message]) -> None:
        for m in messages:
            self.bytes[f"{direction}_down"] += content_bytes(m.content)

    def _chunks(self, direction: str, messages: list[Message]) -> list[list[Message]]:
        """The messages cut into one chunk per node: training by expected work, the rest evenly."""
        parts = min(len(self.nodes), len(messages))
        return ([c for c in split_by_work(messages, parts, self._work_estimate()) if c] if direction == "train"
                else [c for c in split_even(messages, parts) if c])

    def _collect(self, direction: str, outcomes: list[tuple[list[Message], dict, dict]]) -> list[Message]:
        """One reply per client of each ``(chunk, contents, failures)`` (a node's unpacked reply), in
        client order; counts failures, bytes up and stragglers, and keeps each trained client's work."""
        out: list[tuple[int, Message]] = []
        for chunk, contents, failures in outcomes:
            for m in chunk:
                client = m.metadata.dst_node_id
                if client in failures:
                    self.failed[client] += direction == "train"
                    self.last_failure[client] = failures[client]
                    out.append((client, Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, failures[client]), reply_to=m)))
                    continue
                content = contents[client]
                metrics = content.get("metrics")  # (RecordDict.metric_records builds a new dict at every call)
                metrics = metrics if isinstance(metrics, MetricRecord) else {}
                if direction == "train" and "local-steps" in metrics:
                    self.work[client] = float(metrics["local-steps"])
                if self.deadline is not None and float(metrics.get("sim-time", 0.0)) > self.deadline:
                    self.straggled[client] += 1  # its reply would arrive after the round closed
                    continue
                self.bytes[f"{direction}_up"] += content_bytes(content)
                out.append((client, Message(content, reply_to=m)))
        return [message for _, message in sorted(out, key=lambda pair: pair[0])]  # client order, every run

    def _work_estimate(self) -> Callable[[Message], float]:
        """A client's expected training work: its local steps the last time it trained, or the mean
        over the clients seen so far (1 before any)."""
        default = sum(self.work.values()) / len(self.work) if self.work else 1.0
        return lambda message: self.work.get(message.metadata.dst_node_id, default)


@contextmanager
def _seeded_random(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def size_proportional_sample(sizes: list[int], k: int, seed: int, server_round: int) -> list[int]:
    """``k`` distinct clients drawn with probabilities ``p_k = n_k / N`` (q-FFL's ``--sampling=2``,
    litian96/fair_flearn ``flearn/trainers_MTL/fedbase.py`` ``select_clients``: NumPy's ``choice``
    without replacement, weighted by training examples), from a generator seeded by (seed, round)."""
    total = float(sum(sizes))
    rng = np.random.default_rng([seed, server_round, 17])
    return sorted(int(i) for i in rng.choice(len(sizes), size=k, replace=False, p=[n / total for n in sizes]))


class SeededSampling:
    """Mixin before a Flower strategy: ``random.sample`` in its node sampling draws from a
    generator seeded with (seed, round, phase), so fixed seeds pick the same clients.

    ``sampling="size_proportional"`` draws the training clients with probability proportional to
    their training examples (``client_sizes``, given by the runner), as q-FFL's experiments do, and
    then counts every sampled reply once (its ``weighted_by_key`` is set to 1 before aggregation):
    the plain average of clients drawn with p_k = n_k/N has FedAvg's example-weighted average as its
    mean, whereas weighting them by n_k again would count sizes twice (fair_flearn's trainers average
    the sampled clients' updates without weights under ``--sampling=2``, ``fedbase.aggregate`` /
    ``simple_average``; the fairness reweightings then weight p_k uniformly as well).
    ``train_all_clients=True`` sends the training message to every client but aggregates only the
    sampled ones' replies (the official pFedMe code trains all users every round, so that every user's
    local / personalized model is fresh when it is evaluated; its FedAvg and Per-FedAvg train only the
    sampled users). The unsampled clients' uploads are counted in ``bytes_up`` like any other."""

    seed: int = 0
    sampling: str = "uniform"
    client_sizes: list[int] | None = None
    train_all_clients: bool = False
    _aggregated: set[int] | None = None

    def __init__(self, *args, seed: int = 0, sampling: str = "uniform", client_sizes: list[int] | None = None,
                 train_all_clients: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if sampling not in ("uniform", "size_proportional"):
            raise ConfigError(f"strategy.server.sampling={sampling!r}: allowed: uniform, size_proportional")
        self.seed, self.sampling, self.client_sizes = seed, sampling, client_sizes
        self.train_all_clients = train_all_clients

    def configure_train(self, server_round, arrays, config, grid):
        with _seeded_random(self.seed * 1_000_003 + 2 * server_round):
            messages = list(super().configure_train(server_round, arrays, config, grid))
        if not messages or (self.sampling == "uniform" and not self.train_all_clients):
            self._aggregated = None
            return messages
        if self.sampling == "size_proportional":
            if self.client_sizes is None:
                raise ConfigError("strategy.server.sampling='size_proportional': the strategy got no client_sizes "
                                  "(the runner passes them); allowed: uniform when building a strategy by hand")
            chosen = size_proportional_sample(self.client_sizes, len(messages), self.seed, server_round)
            messages = self._construct_messages(messages[0].content, chosen, MessageType.TRAIN)
            messages = list(messages)
        self._aggregated = {m.metadata.dst_node_id for m in messages}
        if self.train_all_clients:
            if any(m.content is not messages[0].content for m in messages):
                raise ConfigError("simulation.train_all_clients=true: this strategy sends each client its own "
                                  "message; allowed: strategies that send every client the same model")
            others = [n for n in grid.get_node_ids() if n not in self._aggregated]
            messages += list(self._construct_messages(messages[0].content, others, MessageType.TRAIN))
        return messages

    def aggregated_replies(self, replies):
        """The replies of the clients this round aggregates (all of them unless ``train_all_clients``),
        each of weight 1 under size-proportional sampling."""
        replies = list(replies)
        if self._aggregated is not None:
            replies = [r for r in replies if r.metadata.src_node_id in self._aggregated]
        if self.sampling == "size_proportional":
            for r in replies:
                if not r.has_error():
                    for record in r.content.values():
                        if isinstance(record, MetricRecord) and self.weighted_by_key in record:
                            record[self.weighted_by_key] = 1
        return replies

    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round, self.aggregated_replies(replies))

    def configure_evaluate(self, server_round, arrays, config, grid):
        with _seeded_random(self.seed * 1_000_003 + 2 * server_round + 1):
            return list(super().configure_evaluate(server_round, arrays, config, grid))


def successful(replies: Iterable[Message]) -> list[Message]:
    return [r for r in replies if not r.has_error()]


def evaluate_all(grid: SimulationGrid, arrays: ArrayRecord, server_round: int) -> list[dict]:
    """Evaluate ``arrays`` on every client's held-out split (the ``unseen`` clients too, after their
    personalization step like any other); one metrics row per client."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in grid.all_clients()]
    return client_rows([r.content for r in successful(grid.send_and_receive(messages))])


class Session:
    """What a run does around the strategy (``octomil_sim.runner.RunSession`` implements it)."""

    def start(self, strategy, grid: SimulationGrid) -> tuple[ArrayRecord, int]:
        """The arrays to start from and the first round to run (> 1 when resuming a checkpoint)."""
        raise NotImplementedError

    def after_round(self, server_round: int, arrays: ArrayRecord, train_metrics: MetricRecord | None,
                    evaluate_metrics: MetricRecord | None, strategy, grid: SimulationGrid) -> None:
        raise NotImplementedError

    def checkpoints_after(self, server_round: int) -> bool:
        """Whether ``after_round(server_round)`` saves a checkpoint (then that round's evaluation
        cannot travel with the next round's training; see ``run_rounds``)."""
        return False

    def stopped(self, last_round: int, arrays: ArrayRecord, strategy, grid: SimulationGrid) -> None:
        """The run was asked to stop after ``last_round`` (a signal): keep what it needs to resume."""
        raise NotImplementedError

    def failed(self, error: Exception) -> None:
        """The run cannot go on (``RunError``); the runner raises ``error`` once Flower's engine ended."""
        raise NotImplementedError

    def done(self, arrays: ArrayRecord, rows: list[dict], grid: SimulationGrid,
             averaged_rows: list[dict] | None = None) -> None:
        """``rows``: every client's evaluation of the final model; ``averaged_rows``: of the
        strategy's averaged iterate, for strategies whose guarantee is about it (``average_arrays``)."""
        raise NotImplementedError


def run_rounds(strategy, grid: SimulationGrid, arrays: ArrayRecord, first_round: int, last_round: int,
               after_round: Callable[..., None], should_stop: Callable[[], bool] = lambda: False,
               checkpoints_after: Callable[[int], bool] = lambda server_round: False) -> tuple[ArrayRecord, int]:
    """Flower's ``Strategy.start`` loop (train, aggregate, evaluate, aggregate) over rounds
    ``first_round..last_round``, so that a resumed run keeps its round numbers (which seed sampling
    and every client's SGD). Returns the arrays and the last round run: before ``last_round`` when
    ``should_stop()`` turned true (checked after each round).

    A round's evaluation travels with the next round's training, in one exchange instead of two
    (``SimulationGrid.evaluate_then_train``): both go out with the same model, the clients run the
    evaluation first, and the numbers are those of two exchanges. On Ray each exchange costs about
    0.5-2 ms of transport beyond the clients' work, and small rounds have little work. Then the strategy
    configures round t + 1's training before it aggregates round t's evaluation and ``after_round(t)``
    runs; neither is Flower's contract to depend on (``configure_train`` builds messages; one that
    exchanges messages while an evaluation waits stops the run with a ``RuntimeError``).
    A round's evaluation goes alone when ``checkpoints_after(round)`` (the checkpoint keeps the
    clients' state, which the next training would already have changed), after the last round, when
    a stop was asked, or when the messages are not plain train and evaluate messages. A round's
    ``time_s`` (``RunSession``) then also counts the next round's training: the sum stays the run's."""
    pending: tuple | None = None  # (round, arrays, train metrics, evaluate messages) of an evaluation that waits

    def finish(server_round, round_arrays, train_metrics, evaluate_replies) -> None:
        evaluate_metrics = strategy.aggregate_evaluate(server_round, evaluate_replies)
        after_round(server_round, round_arrays, train_metrics, evaluate_metrics, strategy, grid)

    def evaluate_alone(server_round, round_arrays, train_metrics, evaluate) -> None:
        finish(server_round, round_arrays, train_metrics, grid.send_and_receive(evaluate))

    for server_round in range(first_round, last_round + 1):
        if should_stop():
            if pending is not None:
                evaluate_alone(*pending)
            return arrays, server_round - 1
        exchanges = grid.exchanges
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        if pending is not None and grid.exchanges != exchanges:
            raise RuntimeError(f"{type(strategy).__name__}.configure_train exchanged messages with the clients while "
                               f"round {pending[0]}'s evaluation waited to go with round {server_round}'s training; "
                               "configure_train must only build messages (exchange in aggregate_train instead)")
        if pending is not None and messages and all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            evaluated, training = grid.evaluate_then_train(pending[3], messages)
            finish(*pending[:3], evaluated)
            replies = training()
        else:
            if pending is not None:
                evaluate_alone(*pending)
            replies = grid.send_and_receive(messages)
        pending = None
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        evaluate = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if evaluate and server_round < last_round and not checkpoints_after(server_round) \
                and all(m.metadata.message_type == MessageType.EVALUATE for m in evaluate):
            pending = (server_round, arrays, train_metrics, evaluate)
        else:
            evaluate_alone(server_round, arrays, train_metrics, evaluate)
    return arrays, last_round


def build_server_app(make_strategy: Callable[[], object], session: Callable[[], Session], num_rounds: int,
                     num_clients: int, num_nodes: int, deadline: float | None = None,
                     should_stop: Callable[[], bool] = lambda: False,
                     actors_started: Callable[[], int | None] = lambda: None,
                     startup_timeout: float = STARTUP_TIMEOUT_S, unseen: Iterable[int] = (),
                     driver_node: bool = False) -> ServerApp:
    """A ServerApp that runs ``make_strategy()`` up to round ``num_rounds`` (from where ``session()``
    says to start) and then evaluates the final model on every client; when ``should_stop()`` turns
    true it ends after the current round with ``session().stopped`` instead. A ``RunError`` (nodes or
    actors that never start) goes to ``session().failed``: Flower's engine would only log it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = session()
        try:
            _main(grid, run)
        except RunError as err:
            run.failed(err)

    def _main(grid: Grid, run: Session) -> None:
        sim_grid = SimulationGrid(grid, num_clients, deadline, actors_started=actors_started,
                                  startup_timeout=startup_timeout, unseen=unseen, driver_node=driver_node)
        strategy = make_strategy()
        if not sim_grid.wait_for_nodes(num_nodes, should_stop=should_stop):
            return
        arrays, first_round = run.start(strategy, sim_grid)
        arrays, last = run_rounds(strategy, sim_grid, arrays, first_round, num_rounds, run.after_round, should_stop,
                                  run.checkpoints_after)
        if last < num_rounds:
            run.stopped(last, arrays, strategy, sim_grid)
            return
        averaged = strategy.average_arrays() if hasattr(strategy, "average_arrays") else None
        averaged_rows = evaluate_all(sim_grid, averaged, num_rounds) if averaged is not None else None
        run.done(arrays, evaluate_all(sim_grid, arrays, num_rounds), sim_grid, averaged_rows)

    return app
