"""Paper fidelity of MaxFL, bounded group loss and TERM's running normalizer: each server update against
numbers worked out by hand (see each module's docstring for the equation it implements)."""

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord

from helpers import train_reply
from octomil_sim.errors import ConfigError
from strategies.maxfl import MaxFL, appeal_coefficients, appeal_weights


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
