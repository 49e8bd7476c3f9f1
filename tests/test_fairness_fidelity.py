"""Paper fidelity of MaxFL, bounded group loss and TERM's running normalizer: each server update against
numbers worked out by hand (see each module's docstring for the equation it implements)."""

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord

from helpers import train_reply
from octomil_sim.checkpoint import decode, encode
from octomil_sim.errors import ConfigError
from octomil_sim.runner import strategy_state
from strategies.bounded_group_loss import (BoundedGroupLoss, dual_ascent, lagrangian_weights, project_duals,
                                          running_mean)
from strategies.maxfl import MaxFL, appeal_coefficients, appeal_weights
from strategies.tilted import TiltedFedAvg, normalized_tilted_coefficients, update_log_normalizer


def _replies(arrays, metrics):
    return [train_reply([np.asarray(a, np.float32)], m, node=i + 1) for i, (a, m) in enumerate(zip(arrays, metrics))]


def _sent(values):
    return ArrayRecord([np.asarray(values, np.float32)])


# --- MaxFL (arXiv 2205.14840, Algorithm 1) ----------------------------------------------------------
def test_appeal_weights_never_overflow():
    # sigma'(x) = e^-|x| / (1 + e^-|x|)^2: 0 (not an OverflowError) for gaps of either sign
    assert appeal_weights([1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]) == [0.0, 0.0, 0.25]


def test_appeal_coefficients_by_hand():
    # sum q = 0.4, eps = 0.1: eta_g / 0.5 = 2 eta_g per unit of q
    assert appeal_coefficients([0.25, 0.15], eta_g=1.0, eps=0.1) == pytest.approx([0.5, 0.3])
    assert appeal_coefficients([0.25, 0.15], eta_g=2.0, eps=0.1) == pytest.approx([1.0, 0.6])
    assert appeal_coefficients([0.0, 0.0], eta_g=1.0, eps=1e-3) == [0.0, 0.0]  # no 0/0


def test_maxfl_server_step_by_hand(task_identity):
    # f_i = rho_i for both clients: q = [1/4, 1/4]; eta_g = 1, eps = 1/2: c_i = (1/4) / (1/2 + 1/2) = 1/4.
    # w = 0: w + sum c_i (w_i - w) = (2 + 6) / 4, (4 + 8) / 4 = [2, 3] (a normalised average would give [4, 6]).
    strategy = MaxFL(eta_g=1.0, eps=0.5)
    strategy.sent = _sent([0.0, 0.0])
    replies = _replies([[2.0, 4.0], [6.0, 8.0]], [{"num-examples": 1, "loss_before": 0.7, "rho": 0.7},
                                                  {"num-examples": 3, "loss_before": 1.2, "rho": 1.2}])
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [2.0, 3.0], rtol=1e-6)


def test_maxfl_all_gaps_large_keeps_the_model(task_identity):
    # every sigma' underflows to 0: the step is eta_g * 0 / (0 + eps) = 0, no division by zero
    strategy = MaxFL(eta_g=1.0, eps=1e-3)
    strategy.sent = _sent([0.5, -1.5])
    replies = _replies([[2.0, 4.0], [6.0, 8.0]], [{"num-examples": 1, "loss_before": 1000.0, "rho": 0.1},
                                                  {"num-examples": 1, "loss_before": 0.0, "rho": 900.0}])
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(arrays.to_numpy_ndarrays()[0], np.asarray([0.5, -1.5], np.float32))


def test_maxfl_config_errors():
    with pytest.raises(ConfigError, match=r"strategy.server.eps=0.0: allowed: a number > 0"):
        MaxFL(eps=0.0)
    with pytest.raises(ConfigError, match=r"strategy.server.eta_g=-1.0: allowed: a number > 0"):
        MaxFL(eta_g=-1.0)


# --- bounded group loss (arXiv 2203.10190, 1905.12843) ------------------------------------------------
def test_project_duals_by_hand():
    # inside the set after clipping: only the clip
    assert project_duals({"a": 0.3, "b": -0.1}, 1.0) == {"a": 0.3, "b": 0.0}
    # clipped (0.8, 0.6, 0) sums to 1.4 > 1: theta = (0.8 + 0.6 - 1) / 2 = 0.2 (0 - theta < 0 leaves c out)
    assert project_duals({"a": 0.8, "b": 0.6, "c": -0.2}, 1.0) == pytest.approx({"a": 0.6, "b": 0.4, "c": 0.0})
    # (3, 0.5), B = 1: theta = 3 - 1 = 2 (k = 2 would give 1.25 > 0.5): (1, 0)
    assert project_duals({"a": 3.0, "b": 0.5}, 1.0) == pytest.approx({"a": 1.0, "b": 0.0})
    # no bound: the clip alone
    assert project_duals({"a": 3.0, "b": -0.5}, math.inf) == {"a": 3.0, "b": 0.0}


def test_dual_ascent_is_projected_by_hand():
    # a: 0.5 + 2 (1.0 - 0.5) = 1.5; b: 0 + 2 (2.0 - 0.5) = 3; c keeps 0.7 -> (1.5, 3, 0.7), sum 5.2 > B = 2:
    # theta = (3 + 1.5 - 2) / 2 = 1.25 (k = 3: (5.2 - 2) / 3 = 1.0667 > 0.7 leaves c out): (0.25, 1.75, 0)
    new = dual_ascent({"a": 0.5, "c": 0.7}, {"a": 1.0, "b": 2.0}, bound=0.5, step=2.0, dual_bound=2.0)
    assert new == pytest.approx({"a": 0.25, "b": 1.75, "c": 0.0})


def test_lagrangian_coefficients_sum_to_one_plus_duals():
    # N = 4, N_a = 3, N_b = 1, mu = (0.5, 2): [1/4 + 0.5/3, 2/4 + 1/3, 1/4 + 2] sums to 1 + 2.5
    weights = lagrangian_weights([1, 2, 1], ["a", "a", "b"], {"a": 0.5, "b": 2.0})
    assert weights == pytest.approx([0.25 + 0.5 / 3, 0.5 + 1 / 3, 2.25])
    assert sum(weights) == pytest.approx(3.5)


def test_running_mean_by_hand():
    assert running_mean(running_mean(2.0, 4.0, 2), 9.0, 3) == pytest.approx(5.0)  # (2 + 4 + 9) / 3


def _bgl(tmp_path, **kwargs):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"0": "a", "1": "b"}))
    return BoundedGroupLoss(groups_file=str(path), max_group_loss=1.0, num_clients=2, **kwargs)


def test_bounded_group_loss_rounds_project_and_average(tmp_path, task_identity):
    strategy = _bgl(tmp_path, dual_step=1.0, dual_bound=1.5)
    strategy.sent = _sent([0.0])
    metrics = [{"num-examples": 1, "loss_before": 0.5, "partition-id": 0},
               {"num-examples": 1, "loss_before": 3.0, "partition-id": 1}]
    # round 1, mu = 0: coefficients [1/2, 1/2] (FedAvg): w1 = 0.5 (2 - 0) + 0.5 (4 - 0) = 3.
    # duals: a: max(0, 0 + (0.5 - 1)) = 0; b: 0 + (3 - 1) = 2, projected onto sum <= 1.5: b = 1.5
    arrays, m = strategy.aggregate_train(1, _replies([[2.0], [4.0]], [dict(x) for x in metrics]))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [3.0])
    assert strategy.fairness.mu == pytest.approx({"a": 0.0, "b": 1.5})
    assert m["dual_b"] == pytest.approx(1.5) and m["dual_avg_b"] == pytest.approx(1.5)
    # round 2 from w = 3, mu_b = 1.5: coefficients [1/2, 1/2 + 1.5] = [0.5, 2]:
    # w2 = 3 + 0.5 (2 - 3) + 2 (4 - 3) = 4.5 (a normalised average would give (2 * 0.5 + 4 * 2) / 2.5 = 3.6).
    # duals: b: 1.5 + 2 = 3.5 -> 1.5 (the bound binds); averages: w_bar = (3 + 4.5) / 2, mu_bar_b = 1.5
    strategy.sent = arrays
    arrays, m = strategy.aggregate_train(2, _replies([[2.0], [4.0]], [dict(x) for x in metrics]))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [4.5])
    assert strategy.fairness.mu == pytest.approx({"a": 0.0, "b": 1.5})
    assert strategy.fairness.rounds_averaged == 2
    np.testing.assert_allclose(strategy.average_arrays().to_numpy_ndarrays()[0], [3.75])
    assert strategy.fairness.mu_average == pytest.approx({"a": 0.0, "b": 1.5})
    # the duals and averages are its round_state, so a checkpoint keeps them
    saved = decode(*encode(strategy_state(strategy)))
    assert set(saved) == {"fairness.mu", "fairness.mu_average", "fairness.model_average", "fairness.rounds_averaged"}
    assert saved["fairness.rounds_averaged"] == 2 and float(saved["fairness.model_average"]["0"]) == pytest.approx(3.75)


def test_bounded_group_loss_duals_average_by_hand(tmp_path, task_identity):
    strategy = _bgl(tmp_path, dual_step=0.5, dual_bound=10.0)
    strategy.sent = _sent([0.0])
    # b's loss 3 each round: mu_b = 1, 2, 3 after rounds 1..3 -> mu_bar_b = 2; a's loss 2: mu_a = 0.5, 1, 1.5 -> 1
    metrics = [{"num-examples": 1, "loss_before": 2.0, "partition-id": 0},
               {"num-examples": 1, "loss_before": 3.0, "partition-id": 1}]
    for r in (1, 2, 3):
        strategy.aggregate_train(r, _replies([[0.0], [0.0]], [dict(m) for m in metrics]))
    assert strategy.fairness.mu == pytest.approx({"a": 1.5, "b": 3.0})
    assert strategy.fairness.mu_average == pytest.approx({"a": 1.0, "b": 2.0})


def test_dual_bound_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy.server.dual_bound=0.0: allowed: a number > 0"):
        _bgl(tmp_path, dual_bound=0.0)


# --- TERM's running normalizer (arXiv 2007.01162 Algorithm 1; fair_flearn/flearn/trainers/tilting.py) ---
def test_running_normalizer_by_hand():
    # t = 1, F = (0, ln 3), p = (1/2, 1/2): mean exp(t F) = (1 + 3) / 2 = 2.
    # R starts at 0: R1 = 0.5 * 0 + 0.5 * 2 = 1 -> c = (0.5 * 1, 0.5 * 3) / 1 = (0.5, 1.5)
    losses, sizes = [0.0, math.log(3)], [1, 1]
    log_r = update_log_normalizer(None, losses, sizes, t=1.0, rate=0.5)
    assert log_r == pytest.approx(0.0, abs=1e-12)
    assert normalized_tilted_coefficients(losses, sizes, 1.0, log_r) == pytest.approx([0.5, 1.5])
    # R2 = 0.5 * 1 + 0.5 * 2 = 1.5 -> c = (0.5, 1.5) / 1.5 = (1/3, 1)
    log_r = update_log_normalizer(log_r, losses, sizes, t=1.0, rate=0.5)
    assert math.exp(log_r) == pytest.approx(1.5)
    assert normalized_tilted_coefficients(losses, sizes, 1.0, log_r) == pytest.approx([1 / 3, 1.0])


def test_running_normalizer_does_not_overflow():
    # F = (1000, 1001), t = 1: R1 = 0.25 e^1000 (1 + e), c = (2 / (1 + e), 2 e / (1 + e))
    log_r = update_log_normalizer(None, [1000.0, 1001.0], [1, 1], t=1.0, rate=0.5)
    assert log_r == pytest.approx(1000 + math.log(0.25 * (1 + math.e)))
    assert normalized_tilted_coefficients([1000.0, 1001.0], [1, 1], 1.0, log_r) == pytest.approx(
        [2 / (1 + math.e), 2 * math.e / (1 + math.e)])


def test_tilted_with_running_normalizer_rounds_by_hand(task_identity):
    strategy = TiltedFedAvg(t=1.0, normalizer_rate=0.5)
    metrics = [{"num-examples": 1, "loss_before": 0.0}, {"num-examples": 1, "loss_before": math.log(3)}]
    # round 1: c = (0.5, 1.5), not normalised: w = 0 + 0.5 * 2 + 1.5 * 4 = 7 (a tilted average would give 3.5)
    strategy.sent = _sent([0.0])
    arrays, _ = strategy.aggregate_train(1, _replies([[2.0], [4.0]], [dict(m) for m in metrics]))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [7.0], rtol=1e-6)
    # round 2 from 0 again: c = (1/3, 1): 2/3 + 4 = 14/3; server_lr = 1/2 halves the step
    strategy.server_lr = 0.5
    arrays, _ = strategy.aggregate_train(2, _replies([[2.0], [4.0]], [dict(m) for m in metrics]))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [7 / 3], rtol=1e-6)
    assert math.exp(strategy.fairness.log_normalizer) == pytest.approx(1.5)
    assert strategy_state(strategy) == {"fairness.log_normalizer": strategy.fairness.log_normalizer}  # kept in checkpoints


def test_tilted_normalizer_off_by_default_and_config_error():
    assert TiltedFedAvg(t=1.0).fairness.normalizer_rate is None
    allowed = r"strategy.server.normalizer_rate=0.0: allowed: null \(off\) or a number in \(0, 1\]"
    with pytest.raises(ConfigError, match=allowed):
        TiltedFedAvg(normalizer_rate=0.0)
