"""Several simulated clients per Flower message: the wire format both halves of the runtime share.

Flower's simulation pays per message (dispatch to a Ray actor, polling for the reply) and per node
(its engine walks every node's inbox ten times a second). The strategies still address one message
per *client*; ``SimulationGrid`` packs the messages of a round into one message per Flower node
(a worker, one per Ray actor), the ClientApp unpacks them, runs every client and packs the replies.

A packed ``RecordDict`` holds each client's records under ``"<client>/<key>"``. A record that several
clients share (FedAvg sends one ``ArrayRecord`` to all) travels once: later clients name it in the
``clients`` ConfigRecord (``ref-keys`` -> ``ref-targets``). Failed clients are listed with their reason.

``pack_pair`` carries two lists of clients in one message (an evaluation and the next round's
training, ``SimulationGrid.evaluate_then_train``): the evaluated clients under the ids ``-1 - client``,
so that a client in both lists keeps both contents, and the model both lists share travels once.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ConfigRecord, RecordDict

CLIENTS = "clients"
DRIVER = "driver"  # (in the ``clients`` index) the driver's own node should serve this message


def pack(contents: Sequence[tuple[int, RecordDict]], failures: Sequence[tuple[int, str]] = (),
         driver: bool = False) -> RecordDict:
    """One RecordDict carrying every ``(client, content)``; shared records (same object) once.
    ``driver``: the driver's own node should serve it (``for_driver``)."""
    packed = RecordDict()
    first_key: dict[int, str] = {}
    ref_keys: list[str] = []
    ref_targets: list[str] = []
    for client, content in contents:
        for key, record in content.items():
            name = f"{client}/{key}"
            if id(record) in first_key:
                ref_keys.append(name)
                ref_targets.append(first_key[id(record)])
            else:
                packed[name] = record
                first_key[id(record)] = name
    packed[CLIENTS] = ConfigRecord({
        "ids": [c for c, _ in contents], "ref-keys": ref_keys, "ref-targets": ref_targets,
        "failed-ids": [c for c, _ in failures], "failed-reasons": [r for _, r in failures],
        **({DRIVER: True} if driver else {}),
    })
    return packed


def for_driver(packed) -> bool:
    """Whether a packed message asks for the driver's own node (``SimulationGrid.evaluate_then_train``
    gives it the clients only evaluated; ``local_ray.driver_node_backend`` serves it there)."""
    index = packed.get(CLIENTS) if isinstance(packed, RecordDict) else None
    return isinstance(index, ConfigRecord) and bool(index.get(DRIVER, False))


def unpack(packed: RecordDict) -> tuple[dict[int, RecordDict], dict[int, str]]:
    """``({client: content}, {failed client: reason})`` of a packed RecordDict."""
    index = packed[CLIENTS]
    records: dict[int, dict] = {int(c): {} for c in index["ids"]}
    targets = dict(zip(index["ref-keys"], index["ref-targets"]))
    for name in [k for k in packed.keys() if k != CLIENTS] + list(targets):
        client, key = name.split("/", 1)
        records[int(client)][key] = packed[targets.get(name, name)]
    failures = {int(c): str(r) for c, r in zip(index["failed-ids"], index["failed-reasons"])}
    return {c: RecordDict(r) for c, r in records.items()}, failures


def pack_pair(evaluate: Sequence[tuple[int, RecordDict]], train: Sequence[tuple[int, RecordDict]],
              evaluate_failures: Sequence[tuple[int, str]] = (),
              train_failures: Sequence[tuple[int, str]] = (), driver: bool = False) -> RecordDict:
    """``pack`` of two lists of clients (the first under ids ``-1 - client``); ``unpack_pair`` splits them."""
    return pack([*[(-1 - c, x) for c, x in evaluate], *train],
                [*[(-1 - c, r) for c, r in evaluate_failures], *train_failures], driver)


def unpack_pair(packed: RecordDict) -> tuple[tuple[dict[int, RecordDict], dict[int, str]],
                                             tuple[dict[int, RecordDict], dict[int, str]]]:
    """``((contents, failures), (contents, failures))`` of the two lists in a ``pack_pair``."""
    contents, failures = unpack(packed)

    def split(by_id: dict) -> tuple[dict, dict]:
        return {-1 - c: v for c, v in by_id.items() if c < 0}, {c: v for c, v in by_id.items() if c >= 0}

    (first, second), (first_failed, second_failed) = split(contents), split(failures)
    return (first, first_failed), (second, second_failed)


def split_by_work(items: Sequence, parts: int, work) -> list[list]:
    """``items`` cut into ``parts`` groups of about equal total ``work(item)`` (longest first, each to
    the lightest group so far; ties by position), each group in the items' order. With clients of
    very unequal sizes (Synthetic(1, 1): 50 to 5,000 rows) an even split by count leaves one Ray actor
    waiting for the other; this keeps both busy. Deterministic: the same items and work, the same groups."""
    loads, groups = [0.0] * parts, [[] for _ in range(parts)]
    works = [work(item) for item in items]
    for position in sorted(range(len(items)), key=lambda i: (-works[i], i)):
        lightest = min(range(parts), key=lambda g: (loads[g], g))
        loads[lightest] += works[position]
        groups[lightest].append(position)
    return [[items[i] for i in sorted(group)] for group in groups]


def split_even(items: Sequence, parts: int) -> list[list]:
    """``items`` in order, cut into ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out
