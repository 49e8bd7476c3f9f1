"""FedAvg (McMahan et al., arXiv 1602.05629, Algorithm 1).

Server: ``w <- sum_k n_k w_k / sum_k n_k`` over the sampled clients' updated weights, which is
Flower's own ``FedAvg.aggregate_train``; this module only makes its sampling reproducible.
Client: ``local_epochs`` of minibatch SGD from the received weights.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import nn

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.server_app import SeededSampling
from octomil_sim.training import sgd_epochs


class FedAvg(SeededSampling, FlowerFedAvg):
    """Flower's FedAvg whose client sampling is a function of ``seed`` and the round; it keeps the
    global arrays it last sent (``sent``) for server updates that start from them."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.sent: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)


def local_sgd(model: nn.Module, task: ClientTask, **kwargs) -> float:
    """``hp.epochs`` of SGD on the client's training split (kwargs go to ``sgd_epochs``)."""
    hp, d = task.hp, task.data
    options = {"epochs": hp.epochs, "lr": hp.lr, **kwargs}
    return sgd_epochs(model, d.x_train, d.y_train, batch_size=hp.batch_size,
                      generator=task.generator, **options)


class FedAvgClient(ClientAlgorithm):
    """Local SGD on the client's training split; the global model is also its deployed model."""

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        loss = local_sgd(model, task)
        return model.state_dict(), {"train_loss": loss}
