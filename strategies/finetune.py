"""Fine-tuning baseline: FedAvg, then each client fine-tunes the global model on its own
training split and keeps the result (it is never uploaded). See e.g. Wang et al., arXiv
1910.10252, and the "FedAvg-FT" rows of PFLlib / FL-bench.

Server half: ``strategies.fedavg.FedAvg`` unchanged. Client half: ``FineTuneClient``.
"""

from __future__ import annotations

from torch import nn

from octomil_sim.client_app import ClientTask
from strategies.fedavg import FedAvg, FedAvgClient, local_sgd

__all__ = ["FedAvg", "FineTuneClient"]


class FineTuneClient(FedAvgClient):
    """Trains like FedAvg; personalizes with ``finetune_epochs`` of SGD at ``finetune_lr``."""

    reuses_model = True  # FedAvgClient.train; personalize fine-tunes a copy of its own (the runtime's, not reused)

    def __init__(self, finetune_epochs: int = 5, finetune_lr: float | None = None):
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        lr = task.hp.lr if self.finetune_lr is None else self.finetune_lr
        local_sgd(model, task, epochs=self.finetune_epochs, lr=lr)
        return model
