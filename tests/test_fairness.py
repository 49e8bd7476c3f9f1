"""Tilted ERM, q-FFL, bounded group loss and MaxFL: update math against numbers worked out by hand."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from helpers import constant_mlr, one_example_task, train_reply
from octomil_sim.errors import ConfigError
from octomil_sim.metrics import load_groups
from octomil_sim.runner import fairness_report
from strategies.bounded_group_loss import BoundedGroupLoss, dual_ascent, group_losses, lagrangian_weights
from strategies.fedavg import FedAvg
from strategies.maxfl import MaxFLClient, appeal_weights
from strategies.qffl import QFFL
from strategies.tilted import TiltedFedAvg, tilted_weights


def _replies(arrays, metrics):
    return [train_reply([np.asarray(a, np.float32)], m, node=i + 1) for i, (a, m) in enumerate(zip(arrays, metrics))]


# --- tilted ERM ---------------------------------------------------------------------------------
def test_tilted_weights_by_hand():
    assert tilted_weights([1.0, 2.0], [1, 1], t=1.0) == pytest.approx([math.exp(-1), 1.0])
    assert tilted_weights([1.0, 2.0], [3, 1], t=-1.0) == pytest.approx([3.0, math.exp(-1)])
    assert tilted_weights([5.0, 0.1, 2.0], [4, 7, 9], t=0.0) == [4.0, 7.0, 9.0]  # exactly n_k


def test_tilt_one_by_hand(task_identity):
    replies = _replies([[0.0], [1.0]], [{"num-examples": 1, "loss_before": 1.0}, {"num-examples": 1, "loss_before": 2.0}])
    arrays, _ = TiltedFedAvg(t=1.0).aggregate_train(1, replies)
    # (0 * e^-1 + 1 * 1) / (e^-1 + 1)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [1 / (1 + math.exp(-1))], rtol=1e-6)


def test_tilt_zero_is_fedavg_bit_for_bit(task_identity):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(7, 3)).astype(np.float32) for _ in range(5)]
    metrics = [{"num-examples": int(n), "loss_before": float(l), "train_loss": float(l)}
               for n, l in zip(rng.integers(1, 500, 5), rng.uniform(0, 5, 5))]
    ours, ours_m = TiltedFedAvg(t=0.0).aggregate_train(1, _replies(arrays, [dict(m) for m in metrics]))
    theirs, theirs_m = FedAvg().aggregate_train(1, _replies(arrays, [dict(m) for m in metrics]))
    assert np.array_equal(ours.to_numpy_ndarrays()[0], theirs.to_numpy_ndarrays()[0])
    assert dict(ours_m) == dict(theirs_m)


# --- q-FFL ---------------------------------------------------------------------------------------
def test_qffl_step_by_hand(task_identity):
    # w = 0, lr = 0.1 -> L = 10, q = 1. Client 1: w_1 = [1, 1], F_1 = 1; client 2: w_2 = [3, 3], F_2 = 4.
    # delta_k = F_k^q L (w - w_k): [-10, -10] and [-120, -120].
    # h_k = q F_k^(q-1) ||L (w - w_k)||^2 + L F_k^q: 200 + 10 = 210 and 1800 + 40 = 1840.
    # w_new = w - sum delta / sum h = 130 / 2050 in each coordinate.
    strategy = QFFL(client_learning_rate=0.1, q=1.0)
    strategy.current_arrays = ArrayRecord([np.zeros(2, np.float32)])
    replies = _replies([[1.0, 1.0], [3.0, 3.0]], [{"num-examples": 5, "loss_before": 1.0, "train_loss": 0.0},
                                                 {"num-examples": 5, "loss_before": 4.0, "train_loss": 0.0}])
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [130 / 2050] * 2, rtol=1e-5)


# --- bounded group loss ----------------------------------------------------------------------------
def test_group_math_by_hand():
    assert group_losses([1.0, 3.0, 0.5], [1, 3, 2], ["a", "a", "b"]) == pytest.approx({"a": 2.5, "b": 0.5})
    # a: max(0, 0.5 + 2 (1.0 - 0.5)) = 1.5; b: max(0, 0 + 2 (0.2 - 0.5)) = 0; c untouched
    assert dual_ascent({"a": 0.5, "c": 0.7}, {"a": 1.0, "b": 0.2}, bound=0.5, step=2.0) == pytest.approx(
        {"a": 1.5, "b": 0.0, "c": 0.7})
    # N = 4, N_a = N_b = 2: [1/4, 1/4, 2/4 + 1 * 2/2]
    assert lagrangian_weights([1, 1, 2], ["a", "a", "b"], {"a": 0.0, "b": 1.0}) == pytest.approx([0.25, 0.25, 1.5])


def test_bounded_group_loss_round(tmp_path, task_identity):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"0": "a", "1": "b"}))
    strategy = BoundedGroupLoss(groups_file=str(path), max_group_loss=1.0, dual_step=0.5, dual_bound=10.0,
                                num_clients=2)
    strategy.fairness.mu = {"b": 1.0}
    strategy.sent = ArrayRecord([np.zeros(1, np.float32)])
    replies = _replies([[0.0], [3.0]], [{"num-examples": 1, "loss_before": 0.5, "partition-id": 0},
                                        {"num-examples": 1, "loss_before": 3.0, "partition-id": 1}])
    arrays, metrics = strategy.aggregate_train(1, replies)
    # coefficients [1/2, 1/2 + 1 * 1/1] = [0.5, 1.5], not normalised: w = 0 + 0.5 (0 - 0) + 1.5 (3 - 0) = 4.5
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [4.5])
    # duals: a: max(0, 0 + 0.5 (0.5 - 1)) = 0; b: 1 + 0.5 (3 - 1) = 2
    assert strategy.fairness.mu == pytest.approx({"a": 0.0, "b": 2.0})
    assert metrics["dual_b"] == pytest.approx(2.0)


def test_groups_file_errors(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"groups_file='.*g.json': cannot be read as a JSON object"):
        load_groups(bad)
    bad.write_text(json.dumps({"0": "a"}))
    with pytest.raises(ConfigError, match=r"clients \[1, 2\] have no group; allowed: a group for every client 0..2"):
        load_groups(bad, 3)
    with pytest.raises(ConfigError, match="groups_file=None"):
        BoundedGroupLoss(groups_file=None, max_group_loss=1.0)


def test_fairness_report_groups_bound_and_appeal(make_spec, tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"0": "a", "1": "a", "2": "b"}))
    cfg = make_spec("strategy=bounded_group_loss", f"groups_file={path}", "simulation.num_clients=3",
                   "simulation.clients_per_round=1", "strategy.server.max_group_loss=0.7")
    rows = [{"partition_id": 0, "num_test": 1, "global_acc": 1.0, "global_loss": 0.2, "served": 1.0},
            {"partition_id": 1, "num_test": 3, "global_acc": 0.0, "global_loss": 1.0, "served": 0.0},
            {"partition_id": 2, "num_test": 2, "global_acc": 0.5, "global_loss": 0.5, "served": 1.0}]
    report = fairness_report(cfg, rows)
    assert report["groups"]["a"]["global_loss"] == pytest.approx((0.2 + 3.0) / 4)
    assert report["groups"]["a"]["global_acc"] == pytest.approx(0.25)
    assert report["group_bound"] == {"max_group_loss": 0.7, "loss": "global_loss", "holds": False, "violated_by": ["a"]}
    assert report["appeal"] == {"served": [0, 2], "recommend_personalization": [1], "served_fraction": 2 / 3}


# --- MaxFL -------------------------------------------------------------------------------------
def test_appeal_weights_by_hand():
    s = 1 / (1 + math.exp(-2))
    assert appeal_weights([1.0, 3.0, -1.0], [1.0, 1.0, 1.0]) == pytest.approx([0.25, s * (1 - s), s * (1 - s)])


def test_maxfl_deploys_the_better_model_and_reports_it():
    client = MaxFLClient(local_epochs_rho=30)
    task = one_example_task(lr=0.5)
    # the global model is constant (uniform softmax, loss log 3); the local model fits the one example
    deployed = client.personalize(constant_mlr(0.0), task)
    assert torch.nn.functional.cross_entropy(deployed(task.data.x_train), task.data.y_train) < 0.1
    assert client.report(constant_mlr(0.0), task) == {"served": 0.0}
    _, metrics = client.train(constant_mlr(0.0), task)
    assert metrics["loss_before"] == pytest.approx(math.log(3), rel=1e-6) and metrics["rho"] < 0.1
    # a global model as good as the local one serves the client
    local = task.state.load("maxfl_local")
    good = constant_mlr(0.0)
    good.load_state_dict(local)
    assert client.report(good, task) == {"served": 1.0}
    assert client.personalize(good, task) is good


def test_server_step_by_hand_and_tilted_damping(task_identity):
    from flwr.app import ArrayRecord

    from strategies.fedavg import server_step
    from strategies.tilted import TiltedFedAvg

    torch.testing.assert_close(server_step(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), 0.25),
                               torch.tensor([1.5, 1.5]))  # 0.75 * w + 0.25 * avg
    strategy = TiltedFedAvg(t=0.0, server_lr=0.5)
    strategy.sent = ArrayRecord([np.zeros(2, np.float32)])
    replies = _replies([[2.0, 4.0], [6.0, 8.0]], [{"num-examples": 1, "loss_before": 0.1},
                                                  {"num-examples": 3, "loss_before": 0.2}])
    arrays, _ = strategy.aggregate_train(1, replies)
    # average (2*1 + 6*3)/4 = 5, (4*1 + 8*3)/4 = 7; half a step from 0
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [2.5, 3.5])
