"""FedP3's pruning, sparse coding and masked aggregation against hand-worked numbers."""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies import fedp3
from helpers import one_example_task, train_reply


def test_magnitude_mask_keeps_largest_and_leaves_biases():
    w = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    assert fedp3.magnitude_mask(w, 0.5).tolist() == [[False, True], [True, False]]
    assert fedp3.magnitude_mask(w, 0.75).tolist() == [[False, True], [False, False]]
    assert fedp3.magnitude_mask(torch.tensor([0.0, 1.0]), 0.9).all()


def test_masked_average_by_hand():
    out = fedp3.masked_average([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])],
                               [torch.tensor([True, True, False]), torch.tensor([True, False, False])],
                               [1.0, 3.0], previous=torch.tensor([9.0, 9.0, 9.0]))
    # entry 0: (1*1 + 3*5) / 4 = 4; entry 1: only client 1 kept it: 2; entry 2: nobody: previous 9
    torch.testing.assert_close(out, torch.tensor([4.0, 2.0, 9.0]))


def test_sparse_code_round_trip_and_size():
    w = torch.arange(1.0, 4097.0).reshape(64, 64)
    mask = fedp3.magnitude_mask(w, 0.75)
    enc = fedp3.sparse_encode({"w": w * mask, "b": torch.ones(64)}, {"w": mask, "b": torch.ones(64, dtype=torch.bool)})
    record = ArrayRecord(enc)
    assert record.count_bytes() < ArrayRecord({"w": w, "b": torch.ones(64)}).count_bytes() / 2
    tensors, masks = fedp3.sparse_decode(record, {"w": w, "b": torch.ones(64)})
    torch.testing.assert_close(tensors["w"], w * mask)
    assert torch.equal(masks["w"], mask) and masks["b"].all()


def test_client_trains_its_subnetwork_and_uploads_only_assigned_layers():
    from octomil_sim.models import MLP

    torch.manual_seed(0)
    model = MLP((2,), 3, hidden=(4,))
    state = model.state_dict()
    masks = {n: fedp3.magnitude_mask(t, 0.5) for n, t in state.items()}
    record = ArrayRecord(fedp3.sparse_encode({n: t * masks[n] for n, t in state.items()}, masks))
    task = one_example_task(lr=0.5, config={"upload": ["head"]})
    client = fedp3.FedP3Client()
    loaded = client.load(MLP((2,), 3, hidden=(4,)), record, task)
    upload, metrics = client.train(loaded, task)
    assert set(upload) == {"head.weight::values", "head.weight::mask", "head.bias"}  # body.0 stays home
    trained = task.state.load(fedp3.PERSONAL)
    assert torch.equal(trained["body.0.weight"] == 0, ~masks["body.0.weight"])  # pruned weights stay 0
    assert not torch.equal(trained["head.bias"], state["head.bias"])  # and the rest did train
    assert metrics["density"] < 1.0


def test_server_prunes_per_resource_class_and_averages_masked(task_identity):
    system = {"classes": {"low": {"share": 0.5}, "high": {"share": 0.5}}, "deadline": None}
    strategy = fedp3.FedP3(target_sparsity={"low": 0.75, "high": 0.0}, system=system, num_clients=2, seed=0)
    assert {strategy.sparsity(0), strategy.sparsity(1)} == {0.75, 0.0}
    strategy.sent = ArrayRecord({"w": torch.zeros(2, 2)})
    full = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]])}
    half = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]])}
    replies = [train_reply(fedp3.sparse_encode(full, {}), {"num-examples": 1}, node=0),
               train_reply(fedp3.sparse_encode(half, {"w": torch.tensor([[True, False], [False, False]])}),
                           {"num-examples": 1}, node=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # entry (0,0): (1 + 3) / 2; the others only from the dense client
    np.testing.assert_allclose(arrays["w"].numpy(), [[2.0, 1.0], [1.0, 1.0]])
    assert strategy.assigned_layers(1, 0, ["a", "b", "c"]) == ["a", "b", "c"]
    strategy.upload_layers = 2
    picks = {tuple(strategy.assigned_layers(r, 0, ["a", "b", "c"])) for r in range(20)}
    assert all(len(p) == 2 for p in picks) and len(picks) > 1


def test_unknown_resource_class_is_an_error():
    import pytest

    from octomil_sim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strategy.server.target_sparsity=.*one for each resource class"):
        fedp3.FedP3(target_sparsity={"tiny": 0.5}, system=None, num_clients=2)


def test_config_record_lists_survive():
    assert list(ConfigRecord({"upload": ["a", "b"]})["upload"]) == ["a", "b"]
