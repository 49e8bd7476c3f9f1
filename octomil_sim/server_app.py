"""The ServerApp: discovers clients, runs the configured Flower strategy, evaluates every client.

Two pieces make any Flower strategy usable for reproducible research:
- ``SimulationGrid`` wraps Flower's Grid: it counts the bytes every message carries down and up,
  lists nodes in partition order and returns replies in partition order, so that aggregation sums
  in the same order in every run;
- ``SeededSampling`` makes a strategy's node sampling a function of (seed, round).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from octomil_sim.metrics import client_rows


def content_bytes(content: RecordDict) -> int:
    """Bytes of model arrays a message carries (Flower's serialized ``ArrayRecord`` size)."""
    return sum(record.count_bytes() for record in content.array_records.values())


class SimulationGrid(Grid):
    """A Grid that delegates to Flower's and records bytes per message type and direction."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.partition_of: dict[int, int] = {}
        self.bytes: Counter[str] = Counter()

    # --- delegation -------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    # --- what this wrapper adds ---------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=lambda n: self.partition_of.get(n, n))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        for m in messages:
            self.bytes[f"{m.metadata.message_type.split('.')[0]}_down"] += content_bytes(m.content)
        replies = self._exchange(messages, timeout)
        for node, r in replies:
            if not r.has_error():
                self.bytes[f"{r.metadata.message_type.split('.')[0]}_up"] += content_bytes(r.content)
        return [r for node, r in sorted(replies, key=lambda nr: self.partition_of.get(nr[0], nr[0]))]

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[tuple[int, Message]]:
        """Send, wait, and pair each reply with the node it answers for (a reply's own
        ``src_node_id`` is not reliable in simulation; its ``reply_to_message_id`` is)."""
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return [(node_of[r.metadata.reply_to_message_id], r) for r in replies]

    def discover(self, num_nodes: int) -> dict[int, int]:
        """Wait for ``num_nodes`` nodes, then ask each for its partition id once; returns
        ``{partition_id: node_id}``."""
        while len(nodes := list(self._grid.get_node_ids())) < num_nodes:
            time.sleep(0.05)
        query = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        for node, reply in self._exchange(query, timeout=None):
            self.partition_of[node] = int(reply.content["metrics"]["partition-id"])
        return {p: n for n, p in self.partition_of.items()}


@contextmanager
def _seeded_random(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class SeededSampling:
    """Mixin before a Flower strategy: ``random.sample`` in its node sampling draws from a
    generator seeded with (seed, round, phase), so fixed seeds pick the same clients."""

    seed: int = 0

    def configure_train(self, server_round, arrays, config, grid):
        with _seeded_random(self.seed * 1_000_003 + 2 * server_round):
            return list(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round, arrays, config, grid):
        with _seeded_random(self.seed * 1_000_003 + 2 * server_round + 1):
            return list(super().configure_evaluate(server_round, arrays, config, grid))


def evaluate_all(grid: SimulationGrid, arrays: ArrayRecord, server_round: int) -> list[dict]:
    """Evaluate ``arrays`` on every client's held-out split; one metrics row per client."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in grid.get_node_ids()]
    replies = grid.send_and_receive(messages)
    return client_rows([r.content for r in replies if not r.has_error()])


RoundHook = Callable[[int, ArrayRecord, dict[str, int]], None]


def build_server_app(
    make_strategy: Callable[[], object],
    initial_arrays: Callable[[], ArrayRecord],
    num_rounds: int,
    num_nodes: int,
    on_round: RoundHook,
    on_done: Callable[[object, list[dict], dict[str, int], float], None],
) -> ServerApp:
    """A ServerApp that runs ``make_strategy()`` for ``num_rounds`` and then evaluates the final
    model on every client; ``on_round(round, arrays, bytes_so_far)`` runs after each round and
    ``on_done(result, client_rows, bytes, seconds)`` once at the end."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.perf_counter()
        sim_grid = SimulationGrid(grid)
        sim_grid.discover(num_nodes)
        strategy = make_strategy()

        def round_hook(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            on_round(server_round, arrays, dict(sim_grid.bytes))
            return None

        result = strategy.start(
            grid=sim_grid, initial_arrays=initial_arrays(), num_rounds=num_rounds,
            evaluate_fn=round_hook,
        )
        rows = evaluate_all(sim_grid, result.arrays, num_rounds)
        on_done(result, rows, dict(sim_grid.bytes), time.perf_counter() - started)

    return app

