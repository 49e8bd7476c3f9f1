"""A client half that fails on purpose, for tests/test_faults.py (importable by the Ray actors:
the driver's sys.path reaches them)."""

import torch

from strategies.fedavg import FedAvgClient


class FlakyClient(FedAvgClient):
    """FedAvg's client that raises in the rounds where ``(client_id + round) % every == 0``."""

    def __init__(self, every: int = 3):
        self.every = every

    def train(self, model, task):
        if (task.client_id + task.server_round) % self.every == 0:
            raise RuntimeError(f"flaky client {task.client_id} in round {task.server_round}")
        return super().train(model, task)


class ItemMLR(torch.nn.Module):
    """MLR whose forward reads a Python number from a tensor (``.item()``): made of Linear layers only,
    so ``cohort.vectorizes`` accepts it, but it cannot run under ``torch.func.vmap``."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        scale = 1.0 if x.abs().sum().item() >= 0 else 2.0
        return self.fc(x.flatten(1)) * scale
