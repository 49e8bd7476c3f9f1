"""FedAvg server and client math against numbers worked out by hand."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from octomil_sim.data import ClientData
from octomil_sim.models import MLR
from octomil_sim.training import LocalTraining
from strategies.fedavg import FedAvg, FedAvgClient
from strategies.finetune import FineTuneClient


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a running ServerApp need Flower's process identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(arrays: dict[str, np.ndarray], n: int, node: int) -> Message:
    ins = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    content = RecordDict({"arrays": ArrayRecord(list(arrays.values())),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": float(n)})})
    return Message(content=content, reply_to=ins)


def test_aggregate_equals_hand_computed_weighted_average():
    replies = [
        _reply({"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array([0.0], np.float32)}, 1, 11),
        _reply({"w": np.array([4.0, 5.0, 6.0], np.float32), "b": np.array([4.0], np.float32)}, 3, 12),
    ]
    arrays, metrics = FedAvg().aggregate_train(1, replies)
    got = arrays.to_numpy_ndarrays()
    # (1*[1,2,3] + 3*[4,5,6]) / 4 = [3.25, 4.25, 5.25];  (1*0 + 3*4) / 4 = 3
    np.testing.assert_allclose(got[0], [3.25, 4.25, 5.25])
    np.testing.assert_allclose(got[1], [3.0])
    assert metrics["train_loss"] == pytest.approx((1 * 1 + 3 * 3) / 4)


def _one_example_client() -> ClientData:
    x = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([0])
    return ClientData(x, y, x, y)


def _zero_mlr() -> MLR:
    model = MLR((2,), 3)
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    return model


def test_client_sgd_step_by_hand():
    # Zero weights: softmax is uniform (1/3); dL/dz = p - onehot(0) = [-2/3, 1/3, 1/3].
    # One SGD step at lr 0.5: W -= 0.5 * (p - e_0) x^T, b -= 0.5 * (p - e_0).
    model = _zero_mlr()
    hp = LocalTraining(epochs=1, batch_size=4, lr=0.5, seed=0)
    out = FedAvgClient().train(model, _one_example_client(), hp, torch.Generator().manual_seed(0))
    assert out["train_loss"] == pytest.approx(np.log(3), rel=1e-6)
    np.testing.assert_allclose(model.fc.weight.detach(), [[1 / 3, 2 / 3], [-1 / 6, -1 / 3], [-1 / 6, -1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(model.fc.bias.detach(), [1 / 3, -1 / 6, -1 / 6], rtol=1e-6)


def test_fedavg_client_deploys_the_global_model_and_finetune_does_not():
    data = _one_example_client()
    hp = LocalTraining(epochs=1, batch_size=4, lr=0.5, seed=0)
    model = _zero_mlr()
    assert FedAvgClient().personalize(model, data, hp, torch.Generator()) is model
    tuned = FineTuneClient(finetune_epochs=2).personalize(_zero_mlr(), data, hp, torch.Generator())
    # two steps of SGD on the single example: its loss must fall below log(3)
    loss = torch.nn.functional.cross_entropy(tuned(data.x_test), data.y_test).item()
    assert loss < np.log(3) - 0.5


def test_seeded_sampling_is_a_function_of_seed_and_round():
    class Grid:
        def get_node_ids(self):
            return list(range(100, 200))

    def picked(seed, server_round):
        strategy = FedAvg(seed=seed, fraction_train=0.1, min_train_nodes=10, min_available_nodes=100)
        msgs = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), Grid())
        return [m.metadata.dst_node_id for m in msgs]

    assert picked(0, 1) == picked(0, 1)
    assert picked(0, 1) != picked(0, 2)
    assert picked(0, 1) != picked(1, 1)
    assert len(set(picked(0, 1))) == 10
