"""FedAvg (McMahan et al., arXiv 1602.05629, Algorithm 1).

Server: ``w <- sum_k n_k w_k / sum_k n_k`` over the sampled clients' updated weights, which is
Flower's own ``FedAvg.aggregate_train``; this module only makes its sampling reproducible.
Client: ``local_epochs`` of minibatch SGD from the received weights.
"""

from __future__ import annotations

import copy

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
import torch
from torch import nn

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.server_app import SeededSampling
from octomil_sim.training import evaluate, sgd_epochs

LOSS_BEFORE = "loss_before"


def server_step(w: torch.Tensor, w_avg: torch.Tensor, lr: float) -> torch.Tensor:
    """``(1 - lr) w + lr w_avg``: a server step of size ``lr`` from the model sent toward the clients'
    average (FedOpt's server learning rate with SGD, arXiv 2003.00295; pFedMe's beta, Eq. 9)."""
    return (1 - lr) * w + lr * w_avg


class FedAvg(SeededSampling, FlowerFedAvg):
    """Flower's FedAvg whose client sampling is a function of ``seed`` and the round; it keeps the
    global arrays it last sent (``sent``) for server updates that start from them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sent: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def step_toward(self, averaged: ArrayRecord | None, lr: float) -> ArrayRecord | None:
        """``server_step`` from the arrays sent this round toward ``averaged`` (as is when lr = 1)."""
        if averaged is None or self.sent is None or lr == 1:
            return averaged
        previous = self.sent.to_torch_state_dict()
        return ArrayRecord({k: server_step(previous[k], v, lr) for k, v in averaged.to_torch_state_dict().items()})


class ReweightedFedAvg(FedAvg):
    """FedAvg whose averaging weight for each reply is ``client_weights(round, metrics)[k]``
    instead of ``num-examples`` (fairness reweighting, Scafflix's alpha^2/gamma).

    ``coefficient_step`` True: the weights are a step's coefficients ``c_k``, not shares to be
    normalised; the server step is ``w + server_lr sum_k c_k (w_k - w)`` = ``step_toward`` the
    c-weighted average with lr ``server_lr S``, ``S = sum_k c_k`` (TERM's running normaliser, MaxFL's
    eta_g / (sum q + eps), bounded group loss's Lagrangian). S = 0 keeps the model sent. False (the
    default): the model is ``step_toward`` the normalised average with lr ``server_lr`` (1: as is)."""

    WEIGHT = "aggregation-weight"
    coefficient_step = False
    server_lr = 1.0

    def client_weights(self, server_round: int, metrics: list[MetricRecord]) -> list[float]:
        raise NotImplementedError

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(self.aggregated_replies(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        metrics = [c["metrics"] for c in contents]
        weights = self.client_weights(server_round, metrics)
        lr = self.server_lr
        if self.coefficient_step:
            lr *= sum(weights)
            if lr == 0:  # no step; equal weights only keep the average defined (it is not used)
                weights = [1.0] * len(weights)
        for m, w in zip(metrics, weights):
            m[self.WEIGHT] = w
        arrays = aggregate_arrayrecords(contents, self.WEIGHT)
        for m in metrics:
            del m[self.WEIGHT]
        return self.step_toward(arrays, lr), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


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
    return sgd_epochs(model, d.x_train, d.y_train, batch_size=hp.batch_size,
                      generator=task.generator, **options)


def stored_local_model(model: nn.Module, task: ClientTask, key: str, epochs: int) -> nn.Module:
    """The client's own model under ``key`` in its state store: the model it trains alone,
    ``argmin f_i`` approximated the first time by ``epochs`` of local SGD from the run's initial
    global model (the same start for every client, whatever round it is first sampled in; Scafflix's
    x_i*, MaxFL's rho_i), then stored. Outside a client runtime (unit tests) it starts from a copy of
    ``model``, which is left untouched either way."""
    local = task.initial_model() if task.initial is not None else copy.deepcopy(model)
    stored = task.state.load(key)
    if stored is None:
        local_sgd(local, task, epochs=epochs, budget=None)  # a one-off precomputation, outside the round budget
        task.state.save(key, local.state_dict())
    else:
        local.load_state_dict(stored)
    return local


class FedAvgClient(ClientAlgorithm):
    """Local SGD on the client's training split; the global model is also its deployed model.
    Reports ``loss_before``, the received global model's loss F_k(w) on the training split, which
    fairness strategies (tilting, q-FFL, group bounds, MaxFL) weight clients by."""

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        loss_before, _ = evaluate(model, task.data.x_train, task.data.y_train)
        loss = local_sgd(model, task)
        return model.state_dict(), {"train_loss": loss, LOSS_BEFORE: loss_before}
