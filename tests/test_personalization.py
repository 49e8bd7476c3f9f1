"""Ditto, pFedMe, Scafflix and personal layers: update math against numbers worked out by hand."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from helpers import GRAD_B, GRAD_W, constant_mlr, one_example_task, train_reply
from octomil_sim.errors import ConfigError
from octomil_sim.models import MLP
from octomil_sim.state import MemoryStateStore
from octomil_sim.training import prox_grad_step
from strategies import pfedme, scafflix
from strategies.ditto import DittoClient
from strategies.personal_layers import PartialUpload, PersonalLayersClient, merge_arrays

T = torch.tensor


def test_prox_grad_step_by_hand():
    # [1,2,3] - 0.1 * ([0.5, 0, -1] + 2 * [1,2,3]) = [0.75, 1.6, 2.5]
    got = prox_grad_step(T([1.0, 2.0, 3.0]), T([0.5, 0.0, -1.0]), T([0.0, 0.0, 0.0]), lam=2.0, lr=0.1)
    torch.testing.assert_close(got, T([0.75, 1.6, 2.5]))


# --- Ditto -------------------------------------------------------------------------------------
def test_ditto_personal_step_by_hand():
    # Stored v = all ones (its softmax is uniform too, so grad = GRAD), received w = 0, lam = 1,
    # personal_lr = 0.5: v <- 1 - 0.5 * (GRAD + 1 * (1 - 0)) = 0.5 - 0.5 * GRAD.
    store = MemoryStateStore()
    task = one_example_task(lr=0.5, store=store)
    task.state.save("ditto_v", constant_mlr(1.0).state_dict())
    model = constant_mlr(0.0)
    upload, _ = DittoClient(lam=1.0, personal_epochs=1, personal_lr=0.5).train(model, task)
    v = store.load(0, "ditto_v")
    torch.testing.assert_close(v["fc.weight"], 0.5 - 0.5 * GRAD_W)
    torch.testing.assert_close(v["fc.bias"], 0.5 - 0.5 * GRAD_B)
    # the global update is FedAvg's, untouched by v: one SGD step from w = 0
    torch.testing.assert_close(upload["fc.weight"], -0.5 * GRAD_W)
    # personalize deploys the stored v, not the global model
    deployed = DittoClient(lam=1.0).personalize(constant_mlr(0.0), task)
    torch.testing.assert_close(deployed.fc.weight.detach(), v["fc.weight"])


def test_ditto_lam_checked():
    with pytest.raises(ConfigError, match=r"strategy.client.lam=-1: allowed: a number >= 0"):
        DittoClient(lam=-1)


# --- pFedMe ------------------------------------------------------------------------------------
def test_pfedme_equations_by_hand():
    # Eq. 8: [1,1,1] - 0.005 * 15 * ([1,1,1] - [0,2,4]) = [0.925, 1.075, 1.225]
    torch.testing.assert_close(pfedme.local_update(T([1.0, 1, 1]), T([0.0, 2, 4]), lam=15, lr=0.005),
                               T([0.925, 1.075, 1.225]))
    # Eq. 9: (1 - 2) [1,2,3] + 2 [3,2,1] = [5, 2, -1]; beta = 1 is the plain average
    torch.testing.assert_close(pfedme.server_update(T([1.0, 2, 3]), T([3.0, 2, 1]), beta=2.0), T([5.0, 2, -1]))
    torch.testing.assert_close(pfedme.server_update(T([1.0, 2, 3]), T([3.0, 2, 1]), beta=1.0), T([3.0, 2, 1]))


def test_pfedme_client_round_by_hand():
    # R = 1, K = 1, personal_lr = 0.5, lam = 1, lr = 0.5 from w = 0:
    # theta = 0 - 0.5 * (GRAD + 1 * (0 - 0)) = -0.5 GRAD; w = 0 - 0.5 * 1 * (0 - theta) = -0.25 GRAD
    client = pfedme.PFedMeClient(lam=1.0, inner_steps=1, personal_lr=0.5, local_rounds=1)
    upload, _ = client.train(constant_mlr(0.0), one_example_task(lr=0.5))
    torch.testing.assert_close(upload["fc.weight"], -0.25 * GRAD_W)
    torch.testing.assert_close(upload["fc.bias"], -0.25 * GRAD_B)


def test_pfedme_server_mixes_with_beta(task_identity):
    strategy = pfedme.PFedMe(beta=2.0)
    strategy.sent = ArrayRecord([np.array([1.0, 1.0], np.float32)])
    replies = [train_reply([np.array([1.0, 3.0], np.float32)], {"num-examples": 1}),
               train_reply([np.array([3.0, 1.0], np.float32)], {"num-examples": 1})]
    arrays, _ = strategy.aggregate_train(1, replies)
    # average [2, 2]; (1 - 2) * [1, 1] + 2 * [2, 2] = [3, 3]
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [3.0, 3.0])


# --- Scafflix ----------------------------------------------------------------------------------
def test_scafflix_equations_by_hand():
    torch.testing.assert_close(scafflix.flix_point(T([1.0, 2, 3]), T([3.0, 2, 1]), 0.25), T([2.5, 2.0, 1.5]))
    # [1,1,1] - (0.1 / 0.5) ([2,0,-2] - [1,1,1]) = [0.8, 1.2, 1.6]
    x_hat = scafflix.local_step(T([1.0, 1, 1]), T([2.0, 0, -2]), T([1.0, 1, 1]), alpha=0.5, gamma=0.1)
    torch.testing.assert_close(x_hat, T([0.8, 1.2, 1.6]))
    # 0 + (0.2 * 0.5 / 0.1) ([1,1,1] - [0.8,1.2,1.6]) = [0.2, -0.2, -0.6]
    torch.testing.assert_close(scafflix.control_variate_update(T([0.0, 0, 0]), T([1.0, 1, 1]), x_hat, 0.5, 0.1, 0.2),
                               T([0.2, -0.2, -0.6]))
    assert scafflix.server_weight(0.5, 0.1) == pytest.approx(2.5)


def test_scafflix_client_two_rounds_by_hand():
    # x* = 0 (stored), so the FLIX point of x = 0 is 0 and the gradient there is GRAD.
    # Round 1 (h = 0, alpha = 0.5, gamma = 0.5, one step): x_hat = 0 - (0.5/0.5)(GRAD - 0) = -GRAD.
    # The new average is x = 0 again (sync): h = 0 + (0.2 * 0.5 / 0.5)(0 - x_hat) = 0.2 GRAD.
    # Round 2 from x = 0: x_hat = 0 - 1 * (GRAD - 0.2 GRAD) = -0.8 GRAD.
    store = MemoryStateStore()
    client = scafflix.ScafflixClient(alpha=0.5)
    config = {"p": 0.2, "local-steps": 1}
    task = one_example_task(lr=0.5, store=store, config=config)
    task.state.save("x_star", constant_mlr(0.0).state_dict())
    upload, metrics = client.train(constant_mlr(0.0), task)
    torch.testing.assert_close(upload["fc.weight"], -GRAD_W)
    assert metrics[scafflix.WEIGHT] == pytest.approx(0.5**2 / 0.5)
    assert store.load(0, "h") is None  # control variates move only when the new average arrives
    client.sync(constant_mlr(0.0), one_example_task(lr=0.5, store=store, config=config))
    torch.testing.assert_close(store.load(0, "h")["fc.weight"], 0.2 * GRAD_W)
    upload, _ = client.train(constant_mlr(0.0), one_example_task(lr=0.5, store=store, config=config))
    torch.testing.assert_close(upload["fc.weight"], -0.8 * GRAD_W)
    torch.testing.assert_close(store.load(0, "h")["fc.bias"], 0.2 * GRAD_B)


def test_scafflix_personalized_model_is_the_flix_point():
    store = MemoryStateStore()
    task = one_example_task(store=store, client_id=1)
    task.state.save("x_star", constant_mlr(2.0).state_dict())
    deployed = scafflix.ScafflixClient(alpha=[0.9, 0.25]).personalize(constant_mlr(1.0), task)
    # client 1: 0.25 * 1 + 0.75 * 2 = 1.75
    torch.testing.assert_close(deployed.fc.weight.detach(), torch.full((3, 2), 1.75))


def test_scafflix_server_weights_and_local_steps(task_identity):
    class Grid:
        sent = []

        def send_and_receive(self, messages):
            self.sent += list(messages)
            return []

    strategy = scafflix.Scafflix(p=0.25, seed=3)
    strategy._grid, strategy._config = Grid(), ConfigRecord({"p": 0.25})
    replies = [train_reply([np.array([1.0, 1.0], np.float32)], {"num-examples": 9, scafflix.WEIGHT: 0.5}, node=7),
               train_reply([np.array([4.0, 4.0], np.float32)], {"num-examples": 1, scafflix.WEIGHT: 1.0}, node=8)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [3.0, 3.0])  # (0.5*1 + 1*4) / 1.5
    # the round's clients that replied get the new average at once, for their control-variate update
    assert [m.metadata.dst_node_id for m in Grid.sent] == [7, 8]
    assert all(m.metadata.message_type == "train.sync" for m in Grid.sent)
    np.testing.assert_allclose(Grid.sent[0].content["arrays"].to_numpy_ndarrays()[0], [3.0, 3.0])
    steps = [strategy.local_steps(r) for r in range(1, 2001)]
    assert steps == [strategy.local_steps(r) for r in range(1, 2001)]
    assert min(steps) >= 1 and np.mean(steps) == pytest.approx(1 / 0.25, rel=0.1)  # Geometric(p)


@pytest.mark.parametrize("alpha", [0.0, 1.5, "x", [0.5, 2.0]])
def test_scafflix_bad_alpha(alpha):
    with pytest.raises(ConfigError, match=r"strategy.client.alpha=.*: allowed: a number in \(0, 1\]"):
        scafflix.ScafflixClient(alpha=alpha)
    with pytest.raises(ConfigError, match=r"one per client \(3 of them\)"):
        scafflix.ScafflixClient(alpha=[0.5, 0.5], num_clients=3)


# --- personal layers ---------------------------------------------------------------------------
def test_merge_arrays_keeps_order_and_replaces_given_keys():
    full = ArrayRecord({"w": T([1.0]), "b": T([2.0])})
    partial = ArrayRecord({"w": T([9.0])})
    merged = merge_arrays(full, partial)
    assert list(merged.keys()) == list(full.keys())
    np.testing.assert_allclose([a.item() for a in merged.to_numpy_ndarrays()], [9.0, 2.0])


def _mlp_task(store, client_id=0):
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    task = one_example_task(lr=0.1, store=store, client_id=client_id)
    task.data.x_train, task.data.y_train, task.data.x_test, task.data.y_test = x, y, x, y
    return task


@pytest.mark.parametrize("head_epochs", [0, 2])
def test_personal_layers_upload_only_shared_and_keep_head(head_epochs):
    store = MemoryStateStore()
    client = PersonalLayersClient(local_layers=["head"], head_epochs=head_epochs)
    torch.manual_seed(1)
    model = MLP((4,), 3, hidden=(5,))
    body_before = model.body[0].weight.detach().clone()
    upload, _ = client.train(model, _mlp_task(store))
    assert set(upload) == {"body.0.weight", "body.0.bias"}
    head = store.load(0, "local_layers")
    assert set(head) == {"head.weight", "head.bias"}
    assert not torch.equal(upload["body.0.weight"], body_before)
    # the next global model arrives with another head: the client's own head wins
    fresh = MLP((4,), 3, hidden=(5,))
    deployed = client.personalize(fresh, _mlp_task(store))
    torch.testing.assert_close(deployed.head.weight.detach(), head["head.weight"])


def test_fedrep_head_phase_leaves_body_frozen():
    store = MemoryStateStore()
    client = PersonalLayersClient(sync_layers=["body"], head_epochs=3)
    model = MLP((4,), 3, hidden=(5,))
    body = model.body[0].weight.detach().clone()
    local, shared = client._split(model)
    from strategies.fedavg import local_sgd

    local_sgd(model, _mlp_task(store), epochs=3, params=local)
    torch.testing.assert_close(model.body[0].weight.detach(), body)


def test_partial_upload_merges_into_sent_model(task_identity):
    strategy = PartialUpload()
    strategy.sent = ArrayRecord({"body": T([1.0, 1.0]), "head": T([5.0])})
    replies = [train_reply({"body": T([2.0, 4.0])}, {"num-examples": 1}),
               train_reply({"body": T([4.0, 2.0])}, {"num-examples": 3})]
    arrays, _ = strategy.aggregate_train(1, replies)
    state = arrays.to_torch_state_dict()
    torch.testing.assert_close(state["body"], T([3.5, 2.5]))
    torch.testing.assert_close(state["head"], T([5.0]))


def test_personal_layers_must_split_the_model():
    with pytest.raises(ConfigError, match=r"strategy.client.local_layers=\['fc'\]: leaves every parameter local"):
        PersonalLayersClient(local_layers=["fc"]).check(constant_mlr())
    with pytest.raises(ConfigError, match="exactly one of the two"):
        PersonalLayersClient()
