"""pFedMe as the paper and its official code define it, and Per-FedAvg, on hand-worked numbers.

One example x = [1, 2], y = 0, an MLR (3 classes) at zero: the softmax is uniform, so the gradient
of the cross-entropy is GRAD_W / GRAD_B (tests/helpers.py)."""

import torch
import pytest

from octomil_sim.errors import ConfigError
from strategies import perfedavg, pfedme
from tests.helpers import GRAD_B, GRAD_W, constant_mlr, one_example_task

T = torch.tensor


def grad_at_half_step() -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy gradient (weight, bias) of the MLR at -0.5 GRAD on the one example."""
    probe = constant_mlr(0.0)
    with torch.no_grad():
        probe.fc.weight.copy_(-0.5 * GRAD_W)
        probe.fc.bias.copy_(-0.5 * GRAD_B)
    loss = torch.nn.functional.cross_entropy(probe(T([[1.0, 2.0]])), T([0]))
    gw, gb = torch.autograd.grad(loss, [probe.fc.weight, probe.fc.bias])
    return gw, gb


def test_inner_step_with_the_official_mu_term():
    # theta - lr (grad + lam (theta - w) + mu theta) = 1 - 0.1 (2 + 3 (1 - 0) + 0.5 * 1) = 0.45
    assert pfedme.inner_step(T([1.0]), T([2.0]), T([0.0]), lam=3.0, lr=0.1, mu=0.5).item() == pytest.approx(0.45)
    assert pfedme.inner_step(T([1.0]), T([2.0]), T([0.0]), lam=3.0, lr=0.1).item() == pytest.approx(0.5)


def test_personalized_model_theta_or_local_by_hand():
    # R = 1, K = 1, personal_lr = 0.5, lam = 1, lr = 0.5 from w = 0:
    # theta = -0.5 GRAD (the paper's personalized model); w_local = -0.5 * 1 * (0 - theta) = -0.25 GRAD
    task = one_example_task(lr=0.5)
    client = pfedme.PFedMeClient(lam=1.0, inner_steps=1, personal_lr=0.5, local_rounds=1)
    client.train(constant_mlr(0.0), task)
    theta = client.personalize(constant_mlr(7.0), task)  # whatever global arrives, the stored theta is deployed
    torch.testing.assert_close(theta.fc.weight.detach(), -0.5 * GRAD_W)
    local = pfedme.PFedMeClient(lam=1.0, inner_steps=1, personal_lr=0.5, local_rounds=1,
                                personalized_model="local").personalize(constant_mlr(7.0), task)
    torch.testing.assert_close(local.fc.weight.detach(), -0.25 * GRAD_W)
    torch.testing.assert_close(local.fc.bias.detach(), -0.25 * GRAD_B)
    report = client.report(constant_mlr(0.0), task)
    assert set(report) == {"theta_acc", "theta_loss", "local_acc", "local_loss"}


def test_theta_warm_starts_across_local_rounds():
    # R = 2, K = 1, lam = 1, personal_lr = lr = 0.5, from w = 0. Round 1 as above: theta_1 = -0.5 G,
    # w_1 = -0.25 G. Round 2 continues from theta_1 (the official optimizer), not from w_1:
    # theta_2 = theta_1 - 0.5 (grad(theta_1) + (theta_1 - w_1)); w_2 = w_1 - 0.5 (w_1 - theta_2).
    gw, gb = grad_at_half_step()
    theta2_w = -0.5 * GRAD_W - 0.5 * (gw + (-0.5 * GRAD_W + 0.25 * GRAD_W))
    w2_w = -0.25 * GRAD_W - 0.5 * (-0.25 * GRAD_W - theta2_w)
    task = one_example_task(lr=0.5)
    client = pfedme.PFedMeClient(lam=1.0, inner_steps=1, personal_lr=0.5, local_rounds=2)
    upload, _ = client.train(constant_mlr(0.0), task)
    torch.testing.assert_close(upload["fc.weight"], w2_w)
    torch.testing.assert_close(client.personalize(constant_mlr(0.0), task).fc.weight.detach(), theta2_w)


def test_pfedme_options_checked():
    with pytest.raises(ConfigError, match="strategy.client.personalized_model='best': allowed: theta, local"):
        pfedme.PFedMeClient(personalized_model="best")


def test_perfedavg_equations_by_hand():
    assert perfedavg.adapt_step(T([1.0]), T([2.0]), 0.1).item() == pytest.approx(0.8)
    assert perfedavg.fo_update(T([1.0]), T([2.0]), 0.01).item() == pytest.approx(0.98)
    # 1 - 0.1 (2 - 0.5 * 4) = 1
    assert perfedavg.hf_update(T([1.0]), T([2.0]), T([4.0]), alpha=0.5, beta=0.1).item() == pytest.approx(1.0)


def test_perfedavg_fo_round_by_hand():
    # one example, batch of 1: D = D' = the example. alpha = lr = 0.5, beta = 0.1, from w = 0:
    # temp = -0.5 G; w_new = 0 - 0.1 grad f(temp), gradient at temp worked out by autograd on temp
    gw, gb = grad_at_half_step()
    client = perfedavg.PerFedAvgClient(beta=0.1, local_rounds=1)
    upload, _ = client.train(constant_mlr(0.0), one_example_task(lr=0.5))
    torch.testing.assert_close(upload["fc.weight"], -0.1 * gw)
    torch.testing.assert_close(upload["fc.bias"], -0.1 * gb)


def test_perfedavg_hf_adds_the_hessian_term():
    # at w = 0 the MLR's Hessian-vector product is not zero: HF must differ from FO by beta alpha H g
    fo, _ = perfedavg.PerFedAvgClient(beta=0.1, local_rounds=1).train(constant_mlr(0.0), one_example_task(lr=0.5))
    hf, _ = perfedavg.PerFedAvgClient(beta=0.1, local_rounds=1, variant="hf").train(constant_mlr(0.0),
                                                                                    one_example_task(lr=0.5))
    model = constant_mlr(0.0)
    g = [-fo["fc.weight"] / 0.1, -fo["fc.bias"] / 0.1]  # grad f(temp) recovered from the FO step
    hvp = perfedavg.hessian_vector_product(model, T([[1.0, 2.0]]), T([0]), g)
    torch.testing.assert_close(hf["fc.weight"], fo["fc.weight"] + 0.1 * 0.5 * hvp[0])
    assert not torch.allclose(hf["fc.weight"], fo["fc.weight"])


def test_perfedavg_personalizes_on_training_data_by_one_step():
    task = one_example_task(lr=0.5)  # its test split is the same example; the step reads x_train only
    task.data.x_test, task.data.y_test = T([[9.0, 9.0]]), T([2])
    adapted = perfedavg.PerFedAvgClient().personalize(constant_mlr(0.0), task)
    torch.testing.assert_close(adapted.fc.weight.detach(), -0.5 * GRAD_W)  # w - alpha grad f(w; train batch)


def test_perfedavg_official_test_adaptation_steps_on_test_batches():
    # adapt_on=test_official: alpha step then beta step, both on the test example (here x = [1, 2], y = 0)
    task = one_example_task(lr=0.5)
    adapted = perfedavg.PerFedAvgClient(beta=0.1, adapt_on="test_official").personalize(constant_mlr(0.0), task)
    gw, _ = grad_at_half_step()  # gradient after the alpha step from 0, at -0.5 GRAD
    torch.testing.assert_close(adapted.fc.weight.detach(), -0.5 * GRAD_W - 0.1 * gw)
    with pytest.raises(ConfigError, match="strategy.client.adapt_on='val': allowed: train, test_official"):
        perfedavg.PerFedAvgClient(adapt_on="val")
