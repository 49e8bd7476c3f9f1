"""Tiny hand-checkable inputs shared by the algorithm tests."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from octomil_sim.client_app import ClientTask
from octomil_sim.client_data import ClientData
from octomil_sim.models import MLR
from octomil_sim.state import MemoryStateStore
from octomil_sim.training import LocalTraining

# Gradient of the cross-entropy of a zero (or constant) MLR at x = [1, 2], y = 0: the softmax is
# uniform (1/3 each), so dL/dz = p - onehot(0) = [-2/3, 1/3, 1/3] and dL/dW = (p - e_0) x^T.
GRAD_W = torch.tensor([[-2 / 3, -4 / 3], [1 / 3, 2 / 3], [1 / 3, 2 / 3]])
GRAD_B = torch.tensor([-2 / 3, 1 / 3, 1 / 3])


def one_example_task(lr: float = 0.5, store=None, config: dict | None = None, client_id: int = 0) -> ClientTask:
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    hp = LocalTraining(epochs=1, batch_size=4, lr=lr, seed=0)
    store = store or MemoryStateStore()
    return ClientTask(client_id, 1, ClientData(x, y, x, y), hp, torch.Generator().manual_seed(0),
                      store.bind(client_id), ConfigRecord(config or {}))


def constant_mlr(value: float = 0.0) -> MLR:
    model = MLR((2,), 3)
    torch.nn.init.constant_(model.fc.weight, value)
    torch.nn.init.constant_(model.fc.bias, value)
    return model


def train_reply(arrays, metrics: dict, node: int = 1) -> Message:
    """A train reply; ``arrays`` is a list of NumPy arrays or a dict of named tensors."""
    ins = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    record = ArrayRecord(arrays) if isinstance(arrays, list) else ArrayRecord(dict(arrays))
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=ins)
