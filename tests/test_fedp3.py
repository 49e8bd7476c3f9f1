"""FedP3's layer assignment, pruning, sparse coding and aggregation against hand-worked numbers
(the official code's rules: SonyResearch/FedP3 main.py and models/distributed_training_utils.py)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from octomil_sim.errors import ConfigError
from octomil_sim.models import MLP
from octomil_sim.state import MemoryStateStore
from strategies import fedp3
from helpers import GRAD_B, GRAD_W, constant_mlr, one_example_task, train_reply

CIFAR_LENET = ["conv1", "conv2", "fc1", "fc2", "fc3"]  # the official 5-layer net: 4 non-final layers


def test_layers_uploaded_by_client_id_as_official_opu():
    up = fedp3.uploaded_layers
    # main.py, 100 clients: d1 = id // 25, d2 = (d1 + 1) % 4 (OPU2), d3 = (d1 + 2) % 4 (OPU3), + fc3
    assert up(0, 100, CIFAR_LENET, 2) == ["conv1", "conv2", "fc3"]
    assert up(30, 100, CIFAR_LENET, 2) == ["conv2", "fc1", "fc3"]  # 30 // 25 = 1
    assert up(99, 100, CIFAR_LENET, 2) == ["conv1", "fc2", "fc3"]  # d1 = 3, d2 = 4 % 4 = 0
    assert up(80, 100, CIFAR_LENET, 3) == ["conv1", "conv2", "fc2", "fc3"]  # 3, 0, 1
    assert up(50, 100, CIFAR_LENET, 1) == ["fc1", "fc3"]  # LowerB: layer 50 // 25 = 2
    # EMNIST's 3-layer net: OPU2 uploads every layer (official: w_glob_keys_op = w_glob_keys)
    assert up(70, 100, ["fc1", "fc2", "fc3"], 2) == ["fc1", "fc2", "fc3"]
    assert up(7, 100, CIFAR_LENET, None) == CIFAR_LENET
    assert fedp3.layers_in_order(["body.10.weight", "body.10.bias", "body.2.weight", "head.bias"]) == \
        ["body.10", "body.2", "head"]  # model order, not sorted


def test_magnitude_mask_keeps_int_share_of_largest_and_leaves_biases():
    w = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    assert fedp3.magnitude_mask(w, 0.9).tolist() == [[False, True], [True, True]]  # int(0.9 * 4) = 3 kept
    assert fedp3.magnitude_mask(w, 0.5).tolist() == [[False, True], [True, False]]
    assert fedp3.magnitude_mask(w, 1.0).all()
    assert fedp3.magnitude_mask(torch.tensor([0.0, 1.0]), 0.1).all()


STATE = {"a.weight": torch.tensor([[1.0, -4.0], [3.0, 2.0]]), "a.bias": torch.tensor([0.5, 0.5]),
         "b.weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "head.weight": torch.tensor([[0.1, 0.2]]),
         "head.bias": torch.tensor([0.0])}


def test_server_prunes_only_the_layers_a_client_does_not_upload():
    strategy = fedp3.FedP3(global_keep=0.5, upload_layers=1, system=None, num_clients=2, seed=0)
    upload, masks = strategy.plan(0, STATE)  # block 0 * 2 // 2 = 0: layer a, plus the head
    assert upload == ["a", "head"]
    assert all(masks[n].all() for n in ("a.weight", "a.bias", "head.weight", "head.bias"))
    assert masks["b.weight"].tolist() == [[False, False], [True, True]]  # keeps 7 and 8
    upload, masks = strategy.plan(1, STATE)  # block 1 * 2 // 2 = 1: layer b, plus the head
    assert upload == ["b", "head"]
    assert masks["a.weight"].tolist() == [[False, True], [True, False]] and masks["a.bias"].all()
    assert masks["b.weight"].all() and masks["head.weight"].all()


def test_global_keep_per_resource_class():
    system = {"classes": {"low": {"share": 0.5}, "high": {"share": 0.5}}, "deadline": None}
    strategy = fedp3.FedP3(global_keep={"low": 0.25, "high": 1.0}, system=system, num_clients=2, seed=0)
    assert {strategy.keep(0), strategy.keep(1)} == {0.25, 1.0}
    low = 0 if strategy.keep(0) == 0.25 else 1
    strategy.upload_layers = 1
    _, masks = strategy.plan(low, STATE)
    kept_home = "b.weight" if low == 0 else "a.weight"
    assert int(masks[kept_home].sum()) == 1  # int(0.25 * 4)


def _three_layer_replies():
    # client 0 uploads b and head (2 layers), client 1 uploads a, b and head (3 layers); nobody sends c
    one = lambda v: torch.tensor([[v]])  # noqa: E731
    x = {"b.weight": one(2.0), "head.weight": one(1.0)}
    y = {"a.weight": one(9.0), "b.weight": one(5.0), "head.weight": one(6.0)}
    return [train_reply(fedp3.sparse_encode(x, {}), {"num-examples": 1}, node=0),
            train_reply(fedp3.sparse_encode(y, {}), {"num-examples": 3}, node=1)]


@pytest.mark.parametrize("aggregation, b, head", [
    ("mean", 3.5, 3.5),  # (2 + 5) / 2, (1 + 6) / 2: not weighted by examples (official)
    ("weighted_mean", 3.8, 4.0),  # (2*2 + 3*5) / 5, (2*1 + 3*6) / 5: by layers uploaded
])
def test_aggregation_per_layer_over_its_uploaders(aggregation, b, head, task_identity):
    strategy = fedp3.FedP3(aggregation=aggregation, system=None, num_clients=2, seed=0)
    strategy.sent = ArrayRecord({n: torch.tensor([[v]]) for n, v in
                                 [("a.weight", 0.0), ("b.weight", 0.0), ("c.weight", 7.0), ("head.weight", 0.0)]})
    arrays, _ = strategy.aggregate_train(1, _three_layer_replies())
    out = {n: float(arrays[n].numpy()[0, 0]) for n in ("a.weight", "b.weight", "c.weight", "head.weight")}
    assert out == pytest.approx({"a.weight": 9.0, "b.weight": b, "c.weight": 7.0, "head.weight": head})


def test_clients_of_equal_sparsity_train_every_uploaded_entry():
    """The old bug: both clients got the same magnitude mask of fc.weight (all zeros: the first half)
    and its other half was never trained. The final layer is always uploaded, so it goes down dense."""
    state = constant_mlr(0.0).state_dict()
    strategy = fedp3.FedP3(global_keep=0.5, system=None, num_clients=2, seed=0)
    for client in (0, 1):
        upload, masks = strategy.plan(client, state)
        assert upload == ["fc"] and all(m.all() for m in masks.values())
        task = one_example_task(lr=0.5, config={"upload": upload}, client_id=client)
        fc = fedp3.FedP3Client()
        sent, metrics = fc.train(fc.load(constant_mlr(9.0), ArrayRecord(fedp3.sparse_encode(state, masks)), task), task)
        # one SGD step from zero: -0.5 * grad, every entry (helpers.GRAD_W, GRAD_B)
        torch.testing.assert_close(sent["fc.weight"], -0.5 * GRAD_W)
        torch.testing.assert_close(sent["fc.bias"], -0.5 * GRAD_B)
        assert metrics["density"] == 1.0


def test_client_keeps_its_own_final_layer():
    """Official: the final layer is not in w_glob_keys, so synchronize_with_server never overwrites it."""
    store = MemoryStateStore()
    model = MLP((2,), 3, hidden=(4,))
    own = {n: torch.full_like(t, 7.0) for n, t in model.state_dict().items()}
    task = one_example_task(store=store, config={"upload": ["body.0", "head"]})
    task.state.save(fedp3.PERSONAL, own)
    received = {n: torch.ones_like(t) for n, t in model.state_dict().items()}
    loaded = fedp3.FedP3Client().load(model, ArrayRecord(fedp3.sparse_encode(received, {})), task).state_dict()
    assert (loaded["head.weight"] == 7).all() and (loaded["head.bias"] == 7).all()
    assert (loaded["body.0.weight"] == 1).all()


def test_local_pruning_fixed_and_ordered_dropout_by_hand():
    t = torch.tensor([[4.0, -1.0], [2.0, 3.0]])
    everything = torch.ones(2, 2, dtype=torch.bool)
    assert fedp3.local_mask(t, everything, "fixed", 0.5).tolist() == [[True, False], [False, True]]
    got = torch.tensor([[True, True], [True, False]])  # 3 received; int(0.5 * 3) = 1 kept: the 4
    assert fedp3.local_mask(t, got, "uniform", 0.5).tolist() == [[True, False], [False, False]]
    w, b = torch.ones(4, 2), torch.ones(4)
    assert fedp3.local_mask(w, torch.ones(4, 2, dtype=torch.bool), "od", 0.5).tolist() == \
        [[True, True], [True, True], [False, False], [False, False]]  # first ceil(0.5 * 4) = 2 units
    assert fedp3.local_mask(b, torch.ones(4, dtype=torch.bool), "od", 0.3).tolist() == [True, True, True, False]
    assert fedp3.local_sparsity_draw("fixed", 0.4, np.random.default_rng(0)) == 0.4
    draw = fedp3.local_sparsity_draw("uniform", 0.4, np.random.default_rng(0))
    assert draw == np.random.default_rng(0).uniform(0, 0.4) and 0 <= draw <= 0.4


def test_client_prunes_and_freezes_only_its_kept_home_layers():
    torch.manual_seed(0)
    model = MLP((2,), 3, hidden=(4,))
    state = model.state_dict()
    task = one_example_task(lr=0.5, config={"upload": ["head"]})
    client = fedp3.FedP3Client(local_pruning="fixed", local_sparsity=0.5)
    loaded = client.load(MLP((2,), 3, hidden=(4,)), ArrayRecord(fedp3.sparse_encode(state, {})), task)
    masks = task.received["masks"]
    assert int(masks["body.0.weight"].sum()) == 4 and masks["head.weight"].all()  # int(0.5 * 8) kept
    upload, metrics = client.train(loaded, task)
    assert set(upload) == {"head.weight", "head.bias"}  # dense; body.0 stays home
    trained = task.state.load(fedp3.PERSONAL)
    assert torch.equal(trained["body.0.weight"] == 0, ~masks["body.0.weight"])  # pruned weights stay 0
    assert metrics["density"] < 1.0


def test_sparse_code_round_trip_and_size():
    w = torch.arange(1.0, 4097.0).reshape(64, 64)
    mask = fedp3.magnitude_mask(w, 0.25)
    enc = fedp3.sparse_encode({"w": w * mask, "b": torch.ones(64)}, {"w": mask, "b": torch.ones(64, dtype=torch.bool)})
    record = ArrayRecord(enc)
    assert record.count_bytes() < ArrayRecord({"w": w, "b": torch.ones(64)}).count_bytes() / 2
    tensors, masks = fedp3.sparse_decode(record, {"w": w, "b": torch.ones(64)})
    torch.testing.assert_close(tensors["w"], w * mask)
    assert torch.equal(masks["w"], mask) and masks["b"].all()


def test_masked_average_by_hand():
    out = fedp3.masked_average([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])],
                               [torch.tensor([True, True, False]), torch.tensor([True, False, False])],
                               [1.0, 3.0], previous=torch.tensor([9.0, 9.0, 9.0]))
    # entry 0: (1*1 + 3*5) / 4 = 4; entry 1: only client 1 kept it: 2; entry 2: nobody: previous 9
    torch.testing.assert_close(out, torch.tensor([4.0, 2.0, 9.0]))


@pytest.mark.parametrize("build, message", [
    (lambda: fedp3.FedP3(global_keep={"tiny": 0.5}, system=None, num_clients=2),
     "strategy.server.global_keep={'tiny': 0.5}: allowed: a number in (0, 1], or one for each resource class of system (full)"),
    (lambda: fedp3.FedP3(global_keep=0.0), "strategy.server.global_keep=0.0: allowed: a number in (0, 1]"),
    (lambda: fedp3.FedP3(upload_layers=0), "strategy.server.upload_layers=0: allowed: null or an integer >= 1"),
    (lambda: fedp3.FedP3(aggregation="median"), "strategy.server.aggregation=median: allowed: mean, weighted_mean"),
    (lambda: fedp3.FedP3Client(local_pruning="random"),
     "strategy.client.local_pruning=random: allowed: fixed, uniform, od"),
    (lambda: fedp3.FedP3Client(local_sparsity=1.0), "strategy.client.local_sparsity=1.0: allowed: a number in [0, 1)"),
])
def test_config_errors_name_key_value_and_allowed(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(message)


def test_config_record_lists_survive():
    assert list(ConfigRecord({"upload": ["a", "b"]})["upload"]) == ["a", "b"]
