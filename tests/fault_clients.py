"""A client half that fails on purpose, for tests/test_faults.py (importable by the Ray actors:
the driver's sys.path reaches them)."""

from strategies.fedavg import FedAvgClient


class FlakyClient(FedAvgClient):
    """FedAvg's client that raises in the rounds where ``(client_id + round) % every == 0``."""

    def __init__(self, every: int = 3):
        self.every = every

    def train(self, model, task):
        if (task.client_id + task.server_round) % self.every == 0:
            raise RuntimeError(f"flaky client {task.client_id} in round {task.server_round}")
        return super().train(model, task)
