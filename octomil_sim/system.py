"""System heterogeneity: each client belongs to a resource class with a compute budget, a speed and a
failure rate (FedProx arXiv 1812.06127 Sec. 5.2's partial work; FedScale's clients that drop out or
miss the round's deadline).

``conf/system/*.yaml`` lists the classes with the share of clients in each:

- ``max_steps``: the most local SGD steps the client can run in a round (null: no cap), so a weak
  client returns partial work;
- ``speed``: SGD steps per unit of simulated time; a client's round takes ``steps / speed`` units and
  a reply later than the round's ``deadline`` is a straggler's, which the server never sees;
- ``dropout``: the probability that the client fails during a round it was sampled for.

Which class a client is in, and whether it drops out in a round, are functions of the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from octomil_sim.errors import ConfigError

if TYPE_CHECKING:
    from octomil_sim.spec import RunSpec


class ClientDropout(RuntimeError):
    """Raised inside a client that the system model makes fail this round."""


@dataclass(frozen=True)
class ResourceClass:
    name: str
    share: float
    max_steps: int | None = None
    speed: float = 1.0
    dropout: float = 0.0


@dataclass(frozen=True)
class SystemModel:
    classes: tuple[ResourceClass, ...]
    deadline: float | None
    seed: int
    num_clients: int

    @classmethod
    def of_run(cls, spec: "RunSpec") -> "SystemModel":
        """The system model of a run (``RunSpec.system``, drawn with its seed over its clients)."""
        system = {"classes": spec.system.classes, "deadline": spec.system.deadline}
        return cls.build(system, int(spec.simulation.seed), int(spec.simulation.num_clients))

    @classmethod
    def build(cls, system, seed: int, num_clients: int) -> "SystemModel":
        """From a ``conf/system`` mapping (None: every client in one class with full resources)."""
        system = system or {"classes": {"full": {"share": 1.0}}, "deadline": None}
        classes = []
        for name, spec in system["classes"].items():
            rc = ResourceClass(name=str(name), **dict(spec))
            _check(f"system.classes.{name}.share", rc.share, 0 <= rc.share <= 1, "a number in [0, 1]")
            _check(f"system.classes.{name}.max_steps", rc.max_steps, rc.max_steps is None or rc.max_steps >= 1,
                   "null or an integer >= 1")
            _check(f"system.classes.{name}.speed", rc.speed, rc.speed > 0, "a number > 0")
            _check(f"system.classes.{name}.dropout", rc.dropout, 0 <= rc.dropout < 1, "a number in [0, 1)")
            classes.append(rc)
        total = sum(c.share for c in classes)
        _check("system.classes", {c.name: c.share for c in classes}, classes and abs(total - 1) < 1e-6,
               "classes whose shares sum to 1")
        deadline = system.get("deadline")
        _check("system.deadline", deadline, deadline is None or deadline > 0, "null or a number > 0")
        return cls(tuple(classes), deadline, seed, num_clients)

    @cached_property
    def assignment(self) -> list[str]:
        """The resource class of every client 0..num_clients-1: exact shares, shuffled by the seed."""
        counts = [int(round(c.share * self.num_clients)) for c in self.classes]
        counts[-1] = self.num_clients - sum(counts[:-1])
        names = [c.name for c, n in zip(self.classes, counts) for _ in range(max(n, 0))]
        order = np.random.default_rng([self.seed, 77]).permutation(self.num_clients)
        return [names[i] for i in order]

    def of(self, client_id: int) -> ResourceClass:
        name = self.assignment[client_id]
        return next(c for c in self.classes if c.name == name)

    def drops_out(self, client_id: int, server_round: int) -> bool:
        p = self.of(client_id).dropout
        return p > 0 and np.random.default_rng([self.seed, server_round, client_id, 78]).random() < p

    def duration(self, client_id: int, steps: int) -> float:
        """Simulated time of ``steps`` local SGD steps on this client."""
        return steps / self.of(client_id).speed


def _check(key: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: allowed: {allowed}")
