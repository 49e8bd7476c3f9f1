"""FedAvg (McMahan et al., arXiv 1602.05629, Algorithm 1).

Server: ``w <- sum_k n_k w_k / sum_k n_k`` over the sampled clients' updated weights, which is
Flower's own ``FedAvg.aggregate_train``; this module only makes its sampling reproducible.
Client: ``local_epochs`` of minibatch SGD from the received weights.
"""

from __future__ import annotations

import torch
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import nn

from octomil_sim.client_app import ClientAlgorithm
from octomil_sim.data import ClientData
from octomil_sim.server_app import SeededSampling
from octomil_sim.training import LocalTraining, sgd_epochs


class FedAvg(SeededSampling, FlowerFedAvg):
    """Flower's FedAvg whose client sampling is a function of ``seed`` and the round."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed


class FedAvgClient(ClientAlgorithm):
    """Local SGD on the client's training split; the global model is also its deployed model."""

    def train(self, model: nn.Module, data: ClientData, hp: LocalTraining,
              generator: torch.Generator) -> dict[str, float]:
        loss = sgd_epochs(model, data.x_train, data.y_train, hp.epochs, hp.batch_size, hp.lr, generator)
        return {"train_loss": loss}
