"""Paper/official-code fidelity of Scafflix (per-client gamma_i, x_i*), Ditto (per-client lambda
selection) and FedPer/FedRep (head fit before deploying): numbers worked out by hand."""

from dataclasses import replace

import pytest
import torch

from helpers import GRAD_B, GRAD_W, constant_mlr, one_example_task
from octomil_sim.client_data import ClientData
from octomil_sim.errors import ConfigError
from octomil_sim.models import MLP
from octomil_sim.state import MemoryStateStore
from strategies import ditto, scafflix
from strategies.personal_layers import PersonalLayersClient

T = torch.tensor


# --- Scafflix: gamma_i ---------------------------------------------------------------------------
def test_scafflix_per_client_gamma_by_hand():
    # Client 1 of two: alpha = 0.5, gamma_1 = 0.25 (simulation.lr = 0.5 is not used); x* = 0, x = 0,
    # so the FLIX point is 0 and the gradient there is GRAD.
    # local step: x_hat = 0 - (0.25 / 0.5) GRAD = -0.5 GRAD; server weight 0.5^2 / 0.25 = 1.
    # sync with new x = 0: h = 0 + (0.2 * 0.5 / 0.25)(0 - x_hat) = 0.4 * 0.5 GRAD = 0.2 GRAD.
    # next round from x = 0: x_hat = 0 - 0.5 (GRAD - 0.2 GRAD) = -0.4 GRAD.
    store, config = MemoryStateStore(), {"p": 0.2, "local-steps": 1}
    client = scafflix.ScafflixClient(alpha=0.5, gamma=[1.0, 0.25], num_clients=2)
    task = one_example_task(lr=0.5, store=store, config=config, client_id=1)
    task.state.save("x_star", constant_mlr(0.0).state_dict())
    upload, metrics = client.train(constant_mlr(0.0), task)
    torch.testing.assert_close(upload["fc.weight"], -0.5 * GRAD_W)
    assert metrics[scafflix.WEIGHT] == pytest.approx(1.0)
    client.sync(constant_mlr(0.0), one_example_task(lr=0.5, store=store, config=config, client_id=1))
    torch.testing.assert_close(store.load(1, "h")["fc.bias"], 0.2 * GRAD_B)
    upload, _ = client.train(constant_mlr(0.0), one_example_task(lr=0.5, store=store, config=config, client_id=1))
    torch.testing.assert_close(upload["fc.weight"], -0.4 * GRAD_W)


def test_scafflix_one_gamma_for_all_overrides_lr():
    # gamma = 0.1 for every client, alpha = 0.5: x_hat = -(0.1 / 0.5) GRAD = -0.2 GRAD, weight 0.25 / 0.1 = 2.5
    task = one_example_task(lr=0.5, config={"p": 0.2, "local-steps": 1})
    task.state.save("x_star", constant_mlr(0.0).state_dict())
    upload, metrics = scafflix.ScafflixClient(alpha=0.5, gamma=0.1).train(constant_mlr(0.0), task)
    torch.testing.assert_close(upload["fc.weight"], -0.2 * GRAD_W)
    assert metrics[scafflix.WEIGHT] == pytest.approx(2.5)


@pytest.mark.parametrize("gamma", [0.0, -0.1, "x", [0.1, 0.0, 0.1]])
def test_scafflix_bad_gamma(gamma):
    with pytest.raises(ConfigError, match=r"^strategy.client.gamma=.*: allowed: null \(simulation.lr\), a number > 0"):
        scafflix.ScafflixClient(gamma=gamma, num_clients=3)


def test_scafflix_gamma_list_of_wrong_length():
    with pytest.raises(ConfigError, match=r"^strategy.client.gamma=\[0.1, 0.2\]: a list of 2; .* one per client "
                                          r"\(3 of them\)$"):
        scafflix.ScafflixClient(gamma=[0.1, 0.2], num_clients=3)


def test_scafflix_local_optimum_from_initial_model_with_its_own_lr():
    # x* = argmin f_i, approximated from the run's initial model (0), not from the received model (1):
    # one epoch (one example, one step) at local_optimum_lr = 0.25: x* = 0 - 0.25 GRAD.
    store = MemoryStateStore()
    task = replace(one_example_task(lr=0.5, store=store), initial=lambda: constant_mlr(0.0))
    client = scafflix.ScafflixClient(alpha=0.5, local_optimum_epochs=1, local_optimum_lr=0.25)
    x_star = client.local_optimum(constant_mlr(1.0), task)
    torch.testing.assert_close(x_star[0], -0.25 * GRAD_W)
    torch.testing.assert_close(store.load(0, "x_star")["fc.bias"], -0.25 * GRAD_B)


# --- Ditto: per-client lambda --------------------------------------------------------------------
def test_ditto_select_step_by_hand():
    # v = 1, grad = 0, anchor w = 0, lr = 0.5: the candidate for lam is 1 - 0.5 lam:
    # lam 0.1 -> 0.95, lam 1 -> 0.5, lam 2 -> 0. Validation loss (v - 0.4)^2: 0.3025, 0.01, 0.16.
    step, lam = ditto.select_step([T([1.0])], [T([0.0])], [T([0.0])], [0.1, 1.0, 2.0], 0.5,
                                  lambda s: float((s[0] - 0.4) ** 2))
    assert lam == 1.0
    torch.testing.assert_close(step[0], T([0.5]))
    # ties go to the first candidate
    assert ditto.select_step([T([1.0])], [T([0.0])], [T([0.0])], [2.0, 0.1], 0.5, lambda s: 0.0)[1] == 2.0


def test_ditto_fallback_and_validation_split():
    assert ditto.fallback_lam([0.1, 1.0, 2.0]) == 1.0  # the paper's lambda for few validation examples
    assert ditto.fallback_lam([0.2, 0.05, 0.1]) == 0.1  # the paper's strong-attack set
    x, y = torch.arange(20.0).reshape(20, 1), torch.arange(20)
    rest, x_val, y_val = ditto.validation_split(ClientData(x, y, x[:2], y[:2]), 0.1)
    assert rest.y_train.tolist() == list(range(18)) and y_val.tolist() == [18, 19]  # last 10%, as official


def _skewed_task(val_label: int, store):
    # 45 training rows (x = [1, 2], y = 0) then 5 validation rows (x = [1, 2], y = val_label).
    x = torch.tensor([[1.0, 2.0]]).repeat(50, 1)
    y = torch.zeros(50, dtype=torch.long)
    y[45:] = val_label
    task = one_example_task(lr=0.5, store=store)
    return replace(task, data=ClientData(x, y, x[:1], y[:1]), hp=replace(task.hp, batch_size=50))


@pytest.mark.parametrize("val_label, expected", [(0, 0.1), (1, 2.0)])
def test_ditto_client_selects_lambda_on_its_validation_rows(val_label, expected):
    # Stored v has bias [5, 0, 0] (it predicts class 0), w = 0; a larger lambda shrinks the bias
    # toward w (lr 0.5, lam 2 removes it). Validation rows of class 0 keep it (lam 0.1); rows of
    # class 1 remove it (lam 2). The chosen step is prox_grad_step with that lambda on the 45 rows.
    store = MemoryStateStore()
    v = constant_mlr(0.0)
    with torch.no_grad():
        v.fc.bias.copy_(T([5.0, 0.0, 0.0]))
    store.save(0, ditto.PERSONAL, v.state_dict())
    task = _skewed_task(val_label, store)
    _, metrics = ditto.DittoClient(lam=[0.1, 1.0, 2.0]).train(constant_mlr(0.0), task)
    assert metrics["ditto_lam"] == expected
    p = torch.softmax(T([5.0, 0.0, 0.0]), 0) - T([1.0, 0.0, 0.0])  # dL/dz at v on a class-0 row
    bias = T([5.0, 0.0, 0.0]) - 0.5 * (p + expected * T([5.0, 0.0, 0.0]))
    torch.testing.assert_close(store.load(0, ditto.PERSONAL)["fc.bias"], bias)


def test_ditto_single_lambda_keeps_all_rows_and_list_falls_back_on_small_clients():
    # One example: a list of candidates leaves it no validation rows, so it takes the middle
    # lambda (1); with v = 1, w = 0, lr = 0.5: v = 1 - 0.5 (GRAD + 1) = 0.5 - 0.5 GRAD (as a fixed lam = 1).
    for lam in ([0.1, 1.0, 2.0], 1.0):
        store = MemoryStateStore()
        task = one_example_task(lr=0.5, store=store)
        task.state.save(ditto.PERSONAL, constant_mlr(1.0).state_dict())
        _, metrics = ditto.DittoClient(lam=lam).train(constant_mlr(0.0), task)
        assert metrics["ditto_lam"] == 1.0
        torch.testing.assert_close(store.load(0, ditto.PERSONAL)["fc.weight"], 0.5 - 0.5 * GRAD_W)


@pytest.mark.parametrize("lam", [-1, [0.1, -2.0], [], "x"])
def test_ditto_bad_lam(lam):
    with pytest.raises(ConfigError, match=r"^strategy.client.lam=.*: allowed: a number >= 0, or a list"):
        ditto.DittoClient(lam=lam)


# --- FedPer / FedRep: head fitted on the current body before deploying ---------------------------
def _mlp_task(store):
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    task = one_example_task(lr=0.5, store=store)
    return replace(task, data=ClientData(x, y, x, y), hp=replace(task.hp, batch_size=8))


def test_personalize_fits_own_head_on_current_body_and_stores_nothing():
    store = MemoryStateStore()
    torch.manual_seed(1)
    model = MLP((4,), 3, hidden=(5,))
    own_head = {"head.weight": torch.zeros(3, 5), "head.bias": torch.zeros(3)}
    store.save(0, "local_layers", own_head)
    body = model.body[0].weight.detach().clone()
    # from a zero head the first full-batch step is -lr * dL/dhead with uniform softmax; after
    # one epoch the head is no longer zero, the body is untouched and the stored head unchanged
    deployed = PersonalLayersClient(local_layers=["head"], head_finetune_epochs=1).personalize(model, _mlp_task(store))
    h = deployed.body(_mlp_task(store).data.x_train)
    onehot = torch.nn.functional.one_hot(T([0, 1, 2, 0, 1, 2, 0, 1]), 3).float()
    expected_bias = -0.5 * (torch.full((8, 3), 1 / 3) - onehot).mean(0)
    expected_weight = -0.5 * (torch.full((8, 3), 1 / 3) - onehot).T @ h / 8
    torch.testing.assert_close(deployed.head.bias.detach(), expected_bias)
    torch.testing.assert_close(deployed.head.weight.detach(), expected_weight)
    torch.testing.assert_close(deployed.body[0].weight.detach(), body)
    torch.testing.assert_close(store.load(0, "local_layers")["head.bias"], torch.zeros(3))


def test_personalize_without_finetune_deploys_stored_head():
    store = MemoryStateStore()
    head = {"head.weight": torch.ones(3, 5), "head.bias": torch.ones(3)}
    store.save(0, "local_layers", head)
    deployed = PersonalLayersClient(local_layers=["head"]).personalize(MLP((4,), 3, hidden=(5,)), _mlp_task(store))
    torch.testing.assert_close(deployed.head.weight.detach(), torch.ones(3, 5))


def test_personal_layers_bad_epochs():
    with pytest.raises(ConfigError, match=r"^strategy.client.head_finetune_epochs=-1: allowed: an integer >= 0$"):
        PersonalLayersClient(local_layers=["head"], head_finetune_epochs=-1)


@pytest.mark.parametrize("lam", [0.0, [0.0, 0.0]])
def test_ditto_local_steps_take_the_global_updates_batches(lam):
    # simulation.local_steps = 3 of batch 4 on 50 rows: with lambda 0 and v_k starting from w (its first
    # round), the personal steps are plain SGD on the very batches the global update takes next, so the
    # personal model equals the uploaded one bit for bit; the stream advances once (3 batches), not twice.
    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    store = MemoryStateStore()
    task = one_example_task(lr=0.1, store=store)
    task = replace(task, data=ClientData(x, y, x[:2], y[:2]), hp=replace(task.hp, batch_size=4, local_steps=3))
    model = MLP(input_shape=[4], num_classes=3, hidden=[5])
    upload, _ = ditto.DittoClient(lam=lam, val_fraction=0.1).train(model, task)
    personal = store.load(0, ditto.PERSONAL)
    for k in upload:
        torch.testing.assert_close(personal[k], upload[k], rtol=0, atol=0)
    assert int(store.load(0, "batch_position")["position"]) == 12
