"""Group models under any personalization: hierarchical (group + device) personalization and
multi-task clients with per-task heads, one mechanism for both.

The server keeps ``num_groups`` copies of the layers named in ``group_layers`` (all layers when it is
null) next to the layers every client shares; the global record holds them as ``group<j>.<name>``.
A client works with its group's copy (``select``), under any inner personalization (``inner``: fine-
tuning, Ditto, personal layers, ...), and uploads what the inner one uploads, its group's layers renamed
back to ``group<j>.<name>``; the server averages every array over the clients that uploaded it
(``keywise_average``) and keeps the rest as sent.

- Hierarchical personalization: ``group_layers: null``. A device deploys its group's model personalized
  further by the inner personalization (fine-tuned, Ditto's personal model, its own head). Groups are
  known (``assignment: groups_file``: the groups file names each client's group) or found as in IFCA
  (Ghosh et al., arXiv 2006.04088, Algorithm 2, model averaging): ``assignment: loss`` picks, each time a
  client receives the models, the group whose model has the lowest loss on its training split
  (``ifca_group``), and the server averages each group's model over the clients that picked it.
  IFCA starts the k models from different random initialisations (official code
  jichan3751/ifca: a fresh initialisation per cluster); here group j starts from the run's model built
  with seed ``seed + j`` (``initial_arrays``), group 0 being the run's usual initial model.
- Multi-task clients (FedRep-style body with per-task heads, arXiv 2102.07078; multi-task FL as in
  MOCHA, arXiv 1705.10467): ``group_layers: [head]`` and a groups file naming each client's task. The
  body is averaged over all clients, each task's head over that task's clients; the groups file's
  per-group metrics are then per-task results.

Differences from IFCA: the paper's weight-sharing variant (shared lower layers, per-cluster heads)
is ``assignment: loss`` with ``group_layers: [head]``; clients that never trained pick their group
the same way at evaluation (IFCA evaluates by the same argmin).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors, received_state_dict
from octomil_sim.errors import ConfigError
from octomil_sim.training import evaluate
from strategies.fedavg import FedAvg, server_step

GROUP = "group"


def group_key(group: int, name: str) -> str:
    return f"{GROUP}{group}.{name}"


def is_group_layer(name: str, group_layers: tuple[str, ...] | None) -> bool:
    return group_layers is None or name.startswith(group_layers)


def expand(state: dict, inits: list[dict], group_layers: tuple[str, ...] | None) -> dict:
    """The global record of a model state: shared arrays as they are, then ``group<j>.<name>`` for
    each group ``j`` taken from ``inits[j]`` (the group's initial model)."""
    out = {k: v for k, v in state.items() if not is_group_layer(k, group_layers)}
    for j, init in enumerate(inits):
        out.update({group_key(j, k): v for k, v in init.items() if is_group_layer(k, group_layers)})
    return out


def select(record: dict, group: int) -> dict:
    """The model state of ``group``: the shared arrays and that group's copies under their own names."""
    prefix = f"{GROUP}{group}."
    out = {k: v for k, v in record.items() if not k.startswith(GROUP) or not k.split(".", 1)[0][len(GROUP):].isdigit()}
    out.update({k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)})
    return out


def rename_upload(upload: dict, group: int, group_layers: tuple[str, ...] | None) -> dict:
    """A client's upload with its group's layers under ``group<j>.<name>``."""
    return {group_key(group, k) if is_group_layer(k, group_layers) else k: v for k, v in upload.items()}


def keywise_average(uploads: list[dict], weights: list[float], masses: dict | None = None) -> dict:
    """For every array name, the ``weights``-weighted average over the uploads that carry it
    (a group's layers over that group's clients, the shared ones over all); names no upload carries are
    absent. Sums in float64, in upload order. ``masses``: filled with each name's sum of weights."""
    totals: dict[str, torch.Tensor] = {}
    mass: dict[str, float] = {}
    for upload, w in zip(uploads, weights, strict=True):
        for k, v in upload.items():
            totals[k] = totals.get(k, 0) + w * v.double()
            mass[k] = mass.get(k, 0.0) + w
    dtypes = {k: v.dtype for u in uploads for k, v in u.items()}
    if masses is not None:
        masses.update(mass)
    return {k: (totals[k] / mass[k]).to(dtypes[k]) for k in totals if mass[k] > 0}


def ifca_group(losses: list[float]) -> int:
    """IFCA's cluster estimate: the group whose model has the lowest loss (the first on ties)."""
    return min(range(len(losses)), key=lambda j: (losses[j], j))


def read_groups(path: str | None, key: str) -> tuple[dict[int, int], list[str]]:
    """``{client: group index}`` and the group names (sorted) of a groups file."""
    if not path:
        raise ConfigError(f"{key}.assignment='groups_file' needs groups_file=<JSON {{client: group}}>; allowed: a "
                          "groups file, or assignment=loss (IFCA) with num_groups")
    from octomil_sim.metrics import load_groups

    groups = load_groups(path)
    names = sorted(set(groups.values()))
    return {c: names.index(g) for c, g in groups.items()}, names


def _check(assignment, groups_file, num_groups, key) -> tuple[dict[int, int] | None, int]:
    if assignment not in ("groups_file", "loss"):
        raise ConfigError(f"{key}.assignment={assignment!r}: allowed: groups_file, loss")
    if assignment == "groups_file":
        groups, names = read_groups(groups_file, key)
        if num_groups is not None and num_groups != len(names):
            raise ConfigError(f"{key}.num_groups={num_groups}: the groups file names {len(names)} groups "
                              f"({', '.join(names)}); allowed: null or {len(names)}")
        return groups, len(names)
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ConfigError(f"{key}.num_groups={num_groups}: allowed: an integer >= 1 with assignment=loss")
    return None, num_groups


class GroupModels(FedAvg):
    """FedAvg over ``num_groups`` copies of ``group_layers`` (all layers when null): every array is
    averaged over the clients that uploaded it, with the personalization's (and fairness policy's)
    weights; arrays nobody uploaded this round stay as sent."""

    uploads_differ = True  # each group's clients upload that group's arrays

    def __init__(self, assignment: str = "groups_file", num_groups: int | None = None,
                 group_layers: list[str] | None = None, groups_file: str | None = None, **kwargs):
        super().__init__(**kwargs)
        _, self.num_groups = _check(assignment, groups_file, num_groups, "strategy.server")
        self.group_layers = None if group_layers is None else tuple(group_layers)

    def initial_arrays(self, arrays: ArrayRecord, model_arrays: Callable[[int], ArrayRecord]) -> ArrayRecord:
        """The run's first global record: ``arrays`` (the initial model) for the shared layers and
        group 0, ``model_arrays(j)`` (the model built with seed + j) for group j."""
        inits = [arrays.to_torch_state_dict()] + [model_arrays(j).to_torch_state_dict()
                                                  for j in range(1, self.num_groups)]
        return ArrayRecord(expand(inits[0], inits, self.group_layers))

    def aggregate_train(self, server_round, replies):
        valid = [r for r in self.aggregated_replies(replies) if not r.has_error()]  # uploads differ in keys
        if not valid or self.sent is None:
            return None, None
        contents = [m.content for m in valid]
        weights, lr = self.fair_weights(server_round, contents)
        if lr == 0:
            return self.sent, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        masses: dict = {}
        averaged = keywise_average([c[self.arrayrecord_key].to_torch_state_dict() for c in contents], weights, masses)
        sent = self.sent.to_torch_state_dict()
        coefficient = (self.coefficient_step or (self.fairness is not None and self.fairness.coefficient_step)) \
            and not self.average_only
        total = sum(weights)
        # a coefficient step's lr is server_lr times the coefficients' sum: per array, over the clients that uploaded it
        lrs = {k: (lr * masses[k] / total if coefficient and total else lr) for k in averaged}
        merged = {k: (v if k not in averaged else averaged[k] if lrs[k] == 1 else server_step(v, averaged[k], lrs[k]))
                  for k, v in sent.items()}
        return ArrayRecord(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class GroupClient(ClientAlgorithm):
    """The client half: ``inner`` (any client half) working on the client's group's model. Reports
    ``group`` with its training metrics and its evaluation."""

    def __init__(self, inner: ClientAlgorithm, assignment: str = "groups_file", num_groups: int | None = None,
                 group_layers: list[str] | None = None, groups_file: str | None = None):
        if not isinstance(inner, ClientAlgorithm):
            raise ConfigError(f"strategy.client.inner={inner!r}: allowed: a client half (a _target_ such as "
                              "strategies.finetune.FineTuneClient)")
        if type(inner).load is not ClientAlgorithm.load:
            raise ConfigError(f"strategy.client.inner={type(inner).__name__}: receives models in its own format "
                              "(its own load), which group models do not send; allowed: fedavg, finetune, ditto, "
                              "personal layers, pfedme, perfedavg, scafflix or maxfl client halves")
        self.inner, self.assignment = inner, assignment
        self.groups, self.num_groups = _check(assignment, groups_file, num_groups, "strategy.client")
        self.group_layers = None if group_layers is None else tuple(group_layers)

    @property
    def objective_is_personalized(self) -> bool:
        return self.inner.objective_is_personalized

    @property
    def frozen_parameters_ok(self) -> bool:
        return self.inner.frozen_parameters_ok

    def check(self, model: nn.Module) -> None:
        if self.group_layers is not None and not any(is_group_layer(n, self.group_layers) for n, _ in model.named_parameters()):
            names = ", ".join(n for n, _ in model.named_parameters())
            raise ConfigError(f"strategy.client.group_layers={list(self.group_layers)}: names no layer; allowed: "
                              f"null (the whole model) or name prefixes of {names}")
        self.inner.check(model)

    def group_of(self, model: nn.Module, record: dict, task: ClientTask) -> int:
        if self.groups is not None:
            if task.client_id not in self.groups:
                raise ConfigError(f"groups_file: client {task.client_id} has no group; allowed: a group for every client")
            return self.groups[task.client_id]
        losses = []
        for j in range(self.num_groups):
            model.load_state_dict(select(record, j))
            losses.append(evaluate(model, task.data.x_train, task.data.y_train)[0])
        return ifca_group(losses)

    def load(self, model: nn.Module, arrays: ArrayRecord, task: ClientTask) -> nn.Module:
        record = received_state_dict(arrays)
        if GROUP not in task.received:
            task.received[GROUP] = self.group_of(model, record, task)
        model.load_state_dict(select(record, task.received[GROUP]))
        model.train()
        return model

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        upload, metrics = self.inner.train(model, task)
        j = task.received[GROUP]
        return rename_upload(upload, j, self.group_layers), {**metrics, GROUP: j}

    def train_cohort(self, models, tasks):
        results = self.inner.train_cohort(models, tasks)
        if results is None:
            return None
        return [(rename_upload(up, t.received[GROUP], self.group_layers), {**m, GROUP: t.received[GROUP]})
                for (up, m), t in zip(results, tasks, strict=True)]

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        return self.inner.personalize(model, task)

    def objective_model(self, model: nn.Module, task: ClientTask) -> nn.Module:
        return self.inner.objective_model(model, task)

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        return {**self.inner.report(model, task), GROUP: task.received[GROUP]}

    def sync(self, model: nn.Module, task: ClientTask) -> None:
        self.inner.sync(model, task)


def write_groups(path: str | Path, num_clients: int, names: list[str]) -> Path:
    """A groups file putting client k in group ``names[k % len(names)]`` (what
    ``octomil_sim.data.grouped_clients`` generates), for experiments and tests."""
    path = Path(path)
    path.write_text(json.dumps({str(k): names[k % len(names)] for k in range(num_clients)}))
    return path
