"""FedAvg (McMahan et al., arXiv 1602.05629, Algorithm 1).

Server: ``w <- sum_k n_k w_k / sum_k n_k`` over the sampled clients' updated weights, which is
Flower's own ``FedAvg.aggregate_train``; this module only makes its sampling reproducible.
Client: ``local_epochs`` of minibatch SGD from the received weights (Algorithm 1, ClientUpdate);
``FedAvgClient.train_cohort`` / ``cohort_local_sgd`` take the same steps for all clients of a message
together (``octomil_sim.cohort``; equal to the per-client loop up to float rounding).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
import torch
from torch import nn

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.cohort import cohort_pays, cohort_sgd, step_counts, vectorizes
from octomil_sim.errors import ConfigError
from octomil_sim.server_app import SeededSampling
from octomil_sim.training import evaluate, sgd_epochs

LOSS_BEFORE = "loss_before"
#: train config key: whether FedAvg-family clients measure ``loss_before`` (absent: they do)
MEASURE_LOSS_BEFORE = "measure-loss-before"


def server_step(w: torch.Tensor, w_avg: torch.Tensor, lr: float) -> torch.Tensor:
    """``(1 - lr) w + lr w_avg``: a server step of size ``lr`` from the model sent toward the clients'
    average (FedOpt's server learning rate with SGD, arXiv 2003.00295; pFedMe's beta, Eq. 9)."""
    return (1 - lr) * w + lr * w_avg


class FairnessPolicy:
    """The server half of a fairness method, as a rule for weighting the round's clients, so that any
    personalization's aggregation can apply it to whatever its clients upload (full models, Scafflix's
    FLIX points, FedP3's masked layers, personal-layer partial uploads).

    ``weights(server_round, metrics, base)``: each client's weight in the average, given the
    personalization's own weights ``base`` (``n_k`` for FedAvg, Scafflix's alpha_i^2/gamma_i), which
    play the part of the client sizes ``n_k`` in the fairness method's formula; with FedAvg's base the
    weights are exactly the fairness strategy's. ``coefficient_step`` True: the weights are the
    coefficients ``c_k`` of the step ``w + server_lr sum_k c_k (w_k - w)`` (not shares to normalise).
    ``round_state``: attributes carried over rounds (checkpointed). ``after_aggregate``: what it does
    with the new model (bounded group loss's averaged iterate) and the round's metrics."""

    coefficient_step = False
    server_lr = 1.0
    round_state: tuple[str, ...] = ()
    needs_update_norms = False  # weights() also gets ||w - w_k||^2 per client (q-FFL)

    def weights(self, server_round: int, metrics: list[MetricRecord], base: list[float],
                update_norms: list[float] | None = None) -> list[float]:
        raise NotImplementedError

    def after_aggregate(self, arrays: ArrayRecord | None, metrics: MetricRecord | None) -> None:
        """Called with the new global arrays and the round's aggregated training metrics."""

    def average_arrays(self) -> ArrayRecord | None:
        """An averaged iterate to evaluate besides the final model (None: none)."""
        return None


def policy_under(prefix: str, build: Callable[[], FairnessPolicy]) -> FairnessPolicy:
    """``build()``, with a ``ConfigError`` from the policy's checks naming its key under ``prefix``
    (``strategy.server.`` or ``fairness.policy.``); ``groups_file`` is a top-level key and stays as it is."""
    try:
        return build()
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("groups_file") else f"{prefix}{message}") from None


def _outermost_aggregation(aggregate_train: Callable) -> Callable:
    """``aggregate_train`` that, when it is the outermost call (subclasses extend it through ``super()``),
    hands the round's final global arrays to the fairness policy's ``after_aggregate``: after
    personal layers' merge into the full model and pFedMe's beta step, not before."""

    @functools.wraps(aggregate_train)
    def wrapper(self, server_round, replies):
        self._aggregation_depth = getattr(self, "_aggregation_depth", 0) + 1
        try:
            arrays, metrics = aggregate_train(self, server_round, replies)
        finally:
            self._aggregation_depth -= 1
        if self._aggregation_depth == 0 and self.fairness is not None:
            self.fairness.after_aggregate(arrays, metrics)
        return arrays, metrics

    return wrapper


class FedAvg(SeededSampling, FlowerFedAvg):
    """Flower's FedAvg whose client sampling is a function of ``seed`` and the round; it keeps the
    global arrays it last sent (``sent``) for server updates that start from them. ``fairness``: a
    ``FairnessPolicy`` that weights the clients instead of ``num-examples`` (None: FedAvg's weights,
    Flower's own aggregation, bit for bit)."""

    WEIGHT = "aggregation-weight"
    coefficient_step = False
    server_lr = 1.0
    reads_loss_before = False  # True: a subclass reads its clients' loss_before itself (not through a policy)

    def __init__(self, fairness: FairnessPolicy | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sent: ArrayRecord | None = None
        self.fairness = fairness

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "aggregate_train" in cls.__dict__:
            cls.aggregate_train = _outermost_aggregation(cls.__dict__["aggregate_train"])

    @property
    def round_state(self) -> tuple[str, ...]:
        """Attributes that rounds carry forward (checkpointed): its fairness policy's, as ``fairness.<name>``."""
        return tuple(f"fairness.{n}" for n in self.fairness.round_state) if self.fairness is not None else ()

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = arrays
        if self.fairness is None and not self.reads_loss_before:  # nothing here reads loss_before: clients skip it
            config[MEASURE_LOSS_BEFORE] = False
        return super().configure_train(server_round, arrays, config, grid)

    def step_toward(self, averaged: ArrayRecord | None, lr: float) -> ArrayRecord | None:
        """``server_step`` from the arrays sent this round toward ``averaged`` (as is when lr = 1)."""
        if averaged is None or self.sent is None or lr == 1:
            return averaged
        previous = self.sent.to_torch_state_dict()
        return ArrayRecord({k: server_step(previous[k], v, lr) for k, v in averaged.to_torch_state_dict().items()})

    def client_weights(self, server_round: int, metrics: list[MetricRecord]) -> list[float]:
        """The personalization's own averaging weights: ``num-examples`` (FedAvg)."""
        return [float(m[self.weighted_by_key]) for m in metrics]

    def fair_weights(self, server_round: int, contents: list[RecordDict], base: list[float] | None = None,
                     norms: Callable[[], list[float]] | None = None) -> tuple[list[float], float]:
        """(each reply's weight, the server step's lr): the personalization's weights (``base``, by
        default ``client_weights``) passed through the fairness policy; with a coefficient step the lr
        is ``server_lr`` times the weights' sum. ``norms``: ``||w - w_k||^2`` per reply, for policies
        that need them (default: ``update_norms`` of the uploaded arrays)."""
        metrics = [c["metrics"] for c in contents]
        weights = self.client_weights(server_round, metrics) if base is None else base
        coefficient_step, lr = self.coefficient_step, self.server_lr
        if self.fairness is not None:
            needed = self.fairness.needs_update_norms
            norms = (norms or (lambda: self.update_norms(contents)))() if needed else None
            weights = self.fairness.weights(server_round, metrics, weights, norms)
            coefficient_step = coefficient_step or self.fairness.coefficient_step
            lr *= self.fairness.server_lr
        if coefficient_step:
            total = sum(weights)
            lr = (lr if total else 0.0) if self.average_only else lr * total
        return weights, lr

    def update_norms(self, contents: list[RecordDict]) -> list[float]:
        """``||w - w_k||^2`` over the arrays each reply uploads (those it shares with the model sent)."""
        sent = self.sent.to_torch_state_dict()
        out = []
        for c in contents:
            up = c[self.arrayrecord_key].to_torch_state_dict()
            out.append(float(sum(((sent[k].double() - v.double()) ** 2).sum() for k, v in up.items() if k in sent)))
        return out

    def aggregate_train(self, server_round, replies):
        if self.fairness is None and not self.reweights:
            return super().aggregate_train(server_round, replies)  # Flower's, after SeededSampling's filter
        valid, _ = self._check_and_log_replies(self.aggregated_replies(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        metrics = [c["metrics"] for c in contents]
        weights, lr = self.fair_weights(server_round, contents)
        if lr == 0:  # no step; equal weights only keep the average defined (it is not used)
            weights = [1.0] * len(weights)
        for m, w in zip(metrics, weights):
            m[self.WEIGHT] = w
        arrays = aggregate_arrayrecords(contents, self.WEIGHT)
        for m in metrics:
            del m[self.WEIGHT]
        return self.step_toward(arrays, lr), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    reweights = False  # True: aggregate with client_weights even without a fairness policy
    average_only = False  # True: a coefficient-step policy's weights are normalised (the step is an average)

    def average_arrays(self) -> ArrayRecord | None:
        """The fairness policy's averaged iterate (bounded group loss), if any."""
        return self.fairness.average_arrays() if self.fairness is not None else None


FedAvg.aggregate_train = _outermost_aggregation(FedAvg.aggregate_train)


class ReweightedFedAvg(FedAvg):
    """FedAvg whose averaging weight for each reply is ``client_weights(round, metrics)[k]``
    instead of ``num-examples`` (Scafflix's alpha^2/gamma; the fairness strategies, whose weights come
    from their ``FairnessPolicy``).

    ``coefficient_step`` True: the weights are a step's coefficients ``c_k``, not shares to be
    normalised; the server step is ``w + server_lr sum_k c_k (w_k - w)`` = ``step_toward`` the
    c-weighted average with lr ``server_lr S``, ``S = sum_k c_k`` (TERM's running normaliser, MaxFL's
    eta_g / (sum q + eps), bounded group loss's Lagrangian). S = 0 keeps the model sent. False (the
    default): the model is ``step_toward`` the normalised average with lr ``server_lr`` (1: as is)."""

    reweights = True


def local_sgd(model: nn.Module, task: ClientTask, **kwargs) -> float:
    """``hp.epochs`` of SGD on the client's training split (kwargs go to ``sgd_epochs``), or, with
    ``simulation.local_steps`` and no ``epochs`` given, that many minibatch steps from the client's
    ``BatchStream`` (the official pFedMe code's local work)."""
    hp, d = task.hp, task.data
    if hp.local_steps is not None and "epochs" not in kwargs:
        stream = task.batch_stream()
        kwargs["batches"] = stream.take(hp.local_steps)
        stream.save()
    options = {"epochs": hp.epochs, "lr": hp.lr, "budget": task.budget, **kwargs}
    if task.private is not None and task.private.trains:  # DP-SGD (privacy=dp_sgd) for the training of what is uploaded
        return task.private.sgd_epochs(model, d.x_train, d.y_train, batch_size=hp.batch_size,
                                       generator=task.generator, state=task.state, **options)
    return sgd_epochs(model, d.x_train, d.y_train, batch_size=hp.batch_size,
                      generator=task.generator, **options)


def cohort_local_sgd(models: list[nn.Module], tasks: list[ClientTask], *, epochs: int | None = None,
                     lr: float | None = None, anchors: list[list[torch.Tensor]] | None = None, lam: float = 0.0,
                     batches: list[list[torch.Tensor]] | None = None) -> list[float]:
    """``local_sgd(model_k, task_k, ...)`` for every client of a cohort at once (``octomil_sim.cohort``:
    the same minibatches, steps, budgets and generator draws, equal up to float rounding); each model
    ends with its client's trained weights; returns the clients' losses. ``anchors``/``lam``: the
    proximal term (one anchor list per client); ``batches``: listed minibatches per client. With
    ``simulation.local_steps`` and no ``epochs`` given, each client's ``BatchStream`` gives its steps,
    as in ``local_sgd``. The caller checks ``cohort.vectorizes`` (``ClientAlgorithm.train_cohort``). Where
    the clients' step counts say the loop is faster (``cohort.cohort_pays``: on the CPU, a few clients or
    one long client), they take ``local_sgd``'s own steps one by one: the client-by-client numbers exactly."""
    hp = tasks[0].hp
    streams = []
    if hp.local_steps is not None and epochs is None and batches is None:
        streams = [task.batch_stream() for task in tasks]
        batches = [stream.take(hp.local_steps) for stream in streams]
    epochs, lr = hp.epochs if epochs is None else epochs, hp.lr if lr is None else lr
    xs, ys, budgets = [t.data.x_train for t in tasks], [t.data.y_train for t in tasks], [t.budget for t in tasks]
    if cohort_pays(step_counts([len(y) for y in ys], hp.batch_size, epochs, budgets, batches), xs[0].device):
        states, losses = cohort_sgd(
            models[0], [m.state_dict() for m in models], xs, ys, epochs=epochs, batch_size=hp.batch_size, lr=lr,
            generators=[t.generator for t in tasks], anchors=anchors, lam=lam, budgets=budgets, batches=batches)
        for model, state in zip(models, states):
            model.load_state_dict(state)  # copies out of the cohort's stacked tensors
    else:  # the loop is faster here (cohort.cohort_pays): local_sgd's own steps, client by client
        losses = [sgd_epochs(model, x, y, epochs, hp.batch_size, lr, t.generator,
                             anchor=None if anchors is None else anchors[k], lam=lam, budget=t.budget,
                             batches=None if batches is None else batches[k])
                  for k, (model, t, x, y) in enumerate(zip(models, tasks, xs, ys))]
    for stream in streams:  # saved once the steps are done: a failed cohort leaves the streams as they were
        stream.save()
    return losses


def stored_local_model(model: nn.Module, task: ClientTask, key: str, epochs: int) -> nn.Module:
    """The client's own model under ``key`` in its state store: the model it trains alone,
    ``argmin f_i`` approximated the first time by ``epochs`` of local SGD from the run's initial
    global model (the same start for every client, whatever round it is first sampled in; Scafflix's
    x_i*, MaxFL's rho_i), then stored. Outside a client runtime (unit tests) it starts from a copy of
    ``model``, which is left untouched either way."""
    local = task.initial_model() if task.initial is not None else copy.deepcopy(model)
    stored = task.state.load(key)
    if stored is None:
        # a one-off precomputation, outside the round budget; the model stays on the client (no DP-SGD)
        local_sgd(local, dataclasses.replace(task, private=None), epochs=epochs, budget=None)
        task.state.save(key, local.state_dict())
    else:
        local.load_state_dict(stored)
    return local


class FairnessReport:
    """The client half of a fairness policy, for any personalization: what a client reports with its
    update, measured on the model it received before it trains. Here ``loss_before``, F_k(w) on
    its training split (tilting, q-FFL, bounded group loss); ``strategies.maxfl.AppealReport`` adds
    MaxFL's ``rho``."""

    def metrics(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        return {LOSS_BEFORE: evaluate(model, task.data.x_train, task.data.y_train)[0]}

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        """Extra per-client evaluation numbers (``model``: the global one)."""
        return {}


def loss_before(model: nn.Module, task: ClientTask) -> float:
    """F_k(w), the received model's loss on the training split: the fairness policy's number when it
    measured it already on this model (``task.before``), else evaluated here."""
    if LOSS_BEFORE in task.before:
        return float(task.before[LOSS_BEFORE])
    return evaluate(model, task.data.x_train, task.data.y_train)[0]


def measures_loss_before(task: ClientTask) -> bool:
    """Whether the server reads ``loss_before`` this round: a FedAvg server without a fairness policy
    says it does not (``MEASURE_LOSS_BEFORE``), and the clients skip that pass over their training
    split (it costs about a tenth of an epoch of local SGD for MLR, more for bigger models); any
    other server (q-FFL's, a strategy of one's own) gets it."""
    return bool(task.config.get(MEASURE_LOSS_BEFORE, True))


def reported_loss_before(model: nn.Module, task: ClientTask) -> dict[str, float]:
    """``{loss_before: F_k(w)}`` for a client's reply where the server reads it, else nothing."""
    return {LOSS_BEFORE: loss_before(model, task)} if measures_loss_before(task) else {}


class FedAvgClient(ClientAlgorithm):
    """Local SGD on the client's training split; the global model is also its deployed model.
    Reports ``loss_before``, the received global model's loss F_k(w) on the training split, which
    fairness strategies (tilting, q-FFL, group bounds, MaxFL) weight clients by, unless the server
    says it does not read it (``measures_loss_before``). ``train_cohort`` trains a message's clients
    together (``octomil_sim.cohort``) when the model allows."""

    reuses_model = True  # local_sgd changes parameter values only; the upload is a state dict of them

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        before = reported_loss_before(model, task)
        loss = local_sgd(model, task)
        return model.state_dict(), {"train_loss": loss, **before}

    def train_cohort(self, models: list[nn.Module], tasks: list[ClientTask]):
        if type(self).train is not FedAvgClient.train or not vectorizes(models[0]):
            return None  # a subclass with its own train (MaxFL) goes client by client
        return self.fedavg_cohort(models, tasks)

    @staticmethod
    def fedavg_cohort(models: list[nn.Module], tasks: list[ClientTask]) -> list[tuple[Tensors, dict[str, float]]]:
        """``FedAvgClient.train`` for every client of a cohort at once."""
        befores = [reported_loss_before(m, t) for m, t in zip(models, tasks)]
        losses = cohort_local_sgd(models, tasks)
        return [(m.state_dict(), {"train_loss": loss, **before}) for m, loss, before in zip(models, losses, befores)]
