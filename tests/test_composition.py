"""Personalization x fairness in one run (issue 10, part 1): a fairness method is a ``FairnessPolicy``
that any personalization's aggregation applies to its own client weights. Hand-worked aggregation
numbers, the one-line config errors, and (slow) runs: ``personalization=fedavg fairness=X`` equals
``strategy=X`` bit for bit, and a personalization with ``fairness=none`` is that personalization."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from helpers import train_reply
from octomil_sim.config import validate
from octomil_sim.errors import ConfigError
from strategies.bounded_group_loss import GroupLossBound
from strategies.fedavg import FedAvg, ReweightedFedAvg
from strategies.maxfl import Appeal
from strategies.personal_layers import PartialUpload
from strategies.qffl import QFFL, QFair
from strategies.tilted import Tilted


def _replies(arrays, metrics):
    return [train_reply(a if isinstance(a, dict) else [np.asarray(a, np.float32)], m, node=i + 1)
            for i, (a, m) in enumerate(zip(arrays, metrics))]


class BaseWeights(ReweightedFedAvg):
    """A personalization whose own weights are not n_k (as Scafflix's alpha_i^2 / gamma_i)."""

    def client_weights(self, server_round, metrics):
        return [float(m["own-weight"]) for m in metrics]


def test_tilt_multiplies_the_personalizations_own_weights(task_identity):
    # own weights 1 and 3, losses 1 and 1 + ln 2, t = 1: tilted weights 1 * e^-ln2 = 0.5 and 3 * 1 = 3
    # average of 0 and 7: (0.5 * 0 + 3 * 7) / 3.5 = 6
    strategy = BaseWeights(fairness=Tilted(t=1.0))
    replies = _replies([[0.0], [7.0]], [{"num-examples": 100, "own-weight": 1.0, "loss_before": 1.0},
                                        {"num-examples": 1, "own-weight": 3.0, "loss_before": 1.0 + math.log(2)}])
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [6.0], rtol=1e-6)
    # without the policy the same personalization averages with its own weights: (0 + 21) / 4
    arrays, _ = BaseWeights().aggregate_train(1, _replies([[0.0], [7.0]], [{"num-examples": 1, "own-weight": 1.0},
                                                                            {"num-examples": 1, "own-weight": 3.0}]))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [5.25])


def test_group_bound_on_partial_uploads_averages_only_what_is_uploaded(tmp_path, task_identity):
    """Personal layers: the clients upload ``body`` only; the group bound's coefficients (own weights
    n_k = 1, 1; mu_b = 1: [1/2, 1/2 + 1]) step the body, the head stays as sent."""
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"0": "a", "1": "b"}))
    policy = GroupLossBound(str(groups), max_group_loss=1.0, dual_step=0.5, dual_bound=10.0, num_clients=2)
    policy.mu = {"b": 1.0}
    strategy = PartialUpload(fairness=policy)
    strategy.sent = ArrayRecord({"body": torch.zeros(1), "head": torch.full((1,), 9.0)})
    metrics = [{"num-examples": 1, "loss_before": 0.5, "partition-id": 0},
               {"num-examples": 1, "loss_before": 3.0, "partition-id": 1}]
    arrays, out = strategy.aggregate_train(1, _replies([{"body": torch.zeros(1)}, {"body": torch.full((1,), 2.0)}],
                                                       metrics))
    state = arrays.to_torch_state_dict()
    assert state["body"].tolist() == [3.0]  # 0 + 0.5 (0 - 0) + 1.5 (2 - 0)
    assert state["head"].tolist() == [9.0]  # the head is not uploaded
    assert policy.mu == pytest.approx({"a": 0.0, "b": 2.0}) and out["dual_b"] == pytest.approx(2.0)
    # the averaged iterate is of the whole model (after the merge), so every client can load it at the end
    averaged = strategy.average_arrays().to_torch_state_dict()
    assert averaged["body"].tolist() == [3.0] and averaged["head"].tolist() == [9.0]


def test_the_policy_sees_the_model_after_pfedmes_beta_step(tmp_path, task_identity):
    from strategies.pfedme import PFedMe

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"0": "a", "1": "a"}))
    policy = GroupLossBound(str(groups), max_group_loss=10.0, dual_step=0.5, num_clients=2)
    strategy = PFedMe(beta=0.5, fairness=policy)
    strategy.sent = ArrayRecord([np.zeros(1, np.float32)])
    metrics = [{"num-examples": 1, "loss_before": 0.5, "partition-id": k} for k in (0, 1)]
    arrays, _ = strategy.aggregate_train(1, _replies([[2.0], [2.0]], metrics))
    assert arrays.to_numpy_ndarrays()[0].tolist() == [1.0]  # halfway from 0 to the average 2
    assert policy.average_arrays().to_numpy_ndarrays()[0].tolist() == [1.0]  # the model deployed, not the average


def test_checkpoints_of_the_fairness_strategies_from_before_the_policies_resume(tmp_path):
    from octomil_sim.runner import restore_strategy_state, strategy_state
    from strategies.bounded_group_loss import BoundedGroupLoss

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"0": "a"}))
    strategy = BoundedGroupLoss(groups_file=str(groups), max_group_loss=1.0, num_clients=1)
    restore_strategy_state(strategy, {"mu": {"a": 0.5}, "rounds_averaged": 3})  # the names they had then
    assert strategy.fairness.mu == {"a": 0.5} and strategy.fairness.rounds_averaged == 3
    assert strategy_state(strategy)["fairness.mu"] == {"a": 0.5}


def test_size_proportional_sampling_never_draws_a_held_out_client(make_spec):
    from octomil_sim.runner import client_sizes, unseen_clients

    cfg = make_spec("strategy=qffl", "simulation.unseen_clients=0.3", "simulation.num_clients=20")
    sizes = client_sizes(cfg)["client_sizes"]
    held_out = unseen_clients(cfg)
    assert len(held_out) == 6 and all(sizes[k] == 0 for k in held_out) and all(sizes[k] > 0 for k in range(20)
                                                                                if k not in held_out)


def test_qffl_policy_on_fedavg_is_flowers_qfedavg(task_identity):
    """q-FFL as coefficients c_k = L F_k^q / sum_j h_j equals Flower's q-FedAvg step (float tolerance)."""
    def sent():  # Flower's QFedAvg empties the record it reads
        return ArrayRecord([np.asarray([1.0, -2.0], np.float32)])

    uploads = [[0.5, -1.0], [2.0, -2.5], [1.0, 0.0]]
    metrics = [{"num-examples": n, "loss_before": f} for n, f in ((3, 0.7), (5, 2.0), (2, 1.1))]
    flower = QFFL(client_learning_rate=0.1, q=2.0, sampling="uniform")
    flower.current_arrays = sent()
    expected, _ = flower.aggregate_train(1, _replies(uploads, [dict(m) for m in metrics]))
    ours = FedAvg(fairness=QFair(client_learning_rate=0.1, q=2.0))
    ours.sent = sent()
    got, _ = ours.aggregate_train(1, _replies(uploads, [dict(m) for m in metrics]))
    np.testing.assert_allclose(got.to_numpy_ndarrays()[0], expected.to_numpy_ndarrays()[0], rtol=1e-5)
    np.testing.assert_allclose(got.to_numpy_ndarrays()[0], [1.0232940, -1.9943548], rtol=1e-5)  # by hand


def test_appeal_policy_weights_clients_near_their_boundary(task_identity):
    """MaxFL's coefficients ignore the base weights: q = sigma'(0) = 1/4 for the client at its
    boundary, ~0 for the one far from it; eta_g = 1, eps = 0: the step moves w to that client's model."""
    strategy = BaseWeights(fairness=Appeal(eta_g=1.0, eps=1e-12))
    strategy.sent = ArrayRecord([np.zeros(1, np.float32)])
    replies = _replies([[4.0], [100.0]], [{"num-examples": 1, "own-weight": 1.0, "loss_before": 1.0, "rho": 1.0},
                                          {"num-examples": 1, "own-weight": 50.0, "loss_before": 900.0, "rho": 1.0}])
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [4.0], rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["strategy=tilted", "fairness=tilted"],
     "fairness=tilted: strategy=tilted is a fairness method itself; allowed: fairness=none, or personalization=fedavg "
     "fairness=tilted"),
    (["strategy=qffl", "fairness=maxfl"],
     "fairness=maxfl: strategy=qffl is a fairness method itself; allowed: fairness=none, or personalization=fedavg "
     "fairness=qffl"),
    (["personalization=ditto", "fairness=tilted", "fairness.policy.server_lr=2"],
     "fairness.policy.server_lr=2: allowed: a number in (0, 1]"),
    (["personalization=scafflix", "fairness=bounded_group_loss"],
     "groups_file=None: allowed: a JSON file mapping client id to group (bounded group loss needs groups)"),
])
def test_composition_errors_are_one_line(make_spec, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_spec(*overrides))
    assert str(err.value) == message


@pytest.mark.parametrize("personalization", ["fedavg", "finetune", "ditto", "pfedme", "perfedavg", "scafflix",
                                             "personal_layers", "fedp3"])
def test_every_personalization_composes_with_every_fairness_policy(make_spec, tmp_path, personalization):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({str(k): str(k % 2) for k in range(100)}))
    for fairness in ("tilted", "qffl", "bounded_group_loss", "maxfl"):
        body_and_head = ["model=mlp"] if personalization in ("personal_layers", "fedp3") else []
        validate(make_spec(f"personalization={personalization}", f"fairness={fairness}", f"groups_file={groups}",
                          *body_and_head))


# --- runs -----------------------------------------------------------------------------------------
SMALL = ["simulation.num_clients=12", "simulation.clients_per_round=4", "simulation.rounds=3",
         "simulation.fraction_evaluate=0.25", "simulation.checkpoint_every=0", "progress=false"]
MEASURED = {"time_s", "driver_rss_mb"}


def _numbers(results: dict):
    drop = lambda d: {k: v for k, v in d.items() if k not in MEASURED}  # noqa: E731
    return [drop(r) for r in results["rounds"]], results["clients"], drop(results["final"])


@pytest.mark.slow
@pytest.mark.parametrize("fairness, extra", [
    ("tilted", ["strategy.server.t=5", "fairness.policy.t=5"]),
    ("bounded_group_loss", ["strategy.server.max_group_loss=0.5", "fairness.policy.max_group_loss=0.5"]),
    ("maxfl", ["strategy.client.local_epochs_rho=3", "fairness.client.local_epochs_rho=3"]),
])
def test_fedavg_with_a_fairness_policy_is_that_fairness_strategy_bit_for_bit(make_spec, tmp_path, fairness, extra):
    from octomil_sim.runner import run

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({str(k): "even" if k % 2 == 0 else "odd" for k in range(12)}))
    common = [*SMALL, f"groups_file={groups}"]
    strategy_extra = [e for e in extra if e.startswith("strategy.")]
    fairness_extra = [e for e in extra if e.startswith("fairness.")]
    alone = run(make_spec(*common, f"strategy={fairness}", *strategy_extra), tmp_path / "alone")
    composed = run(make_spec(*common, "personalization=fedavg", f"fairness={fairness}", *fairness_extra),
                   tmp_path / "composed")
    if fairness == "maxfl":  # strategy=maxfl's client also deploys its local model where the global one does
        # not serve it; fedavg deploys the global model: compare the training and the global model only
        for results in (alone, composed):
            for row in results["rounds"] + results["clients"] + [results["final"], results["final"]["best_round"]]:
                for key in [k for k in row if "personalized" in k or "improvement" in k]:
                    del row[key]
    assert _numbers(composed) == _numbers(alone)
    assert composed["name"] == f"fedavg + {fairness} on synthetic"
    assert composed.get("averaged_iterate") == alone.get("averaged_iterate")


@pytest.mark.slow
def test_ditto_with_tilting_runs_and_none_is_ditto_alone(make_spec, tmp_path):
    from octomil_sim.runner import run

    alone = run(make_spec(*SMALL, "strategy=ditto"), tmp_path / "alone")
    none = run(make_spec(*SMALL, "personalization=ditto", "fairness=none"), tmp_path / "none")
    assert _numbers(none) == _numbers(alone)
    tilted = run(make_spec(*SMALL, "personalization=ditto", "fairness=tilted", "fairness.policy.t=5"),
                 tmp_path / "tilted")
    assert tilted["name"] == "ditto + tilted on synthetic"
    assert _numbers(tilted)[0] != _numbers(alone)[0]  # the tilt changed the global model's path


# --- live monitoring and held-out clients (issue 10, part 4) -----------------------------------------
@pytest.mark.slow
def test_rounds_are_logged_while_the_run_goes_with_per_group_curves(make_spec, tmp_path, monkeypatch):
    import octomil_sim.runner as runner

    seen = []

    class Recorder:
        def log_round(self, row):
            seen.append((row["round"], (tmp_path / "run" / "results.json").exists(), dict(row)))

        def finish(self, summary):
            seen.append(("finish", (tmp_path / "run" / "results.json").exists(), summary))

    monkeypatch.setattr(runner, "make_logger", lambda spec, out: Recorder())
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({str(k): "even" if k % 2 == 0 else "odd" for k in range(12)}))
    runner.run(make_spec(*SMALL, "simulation.fraction_evaluate=1", f"groups_file={groups}"), tmp_path / "run")
    assert [r for r, _, _ in seen] == [1, 2, 3, "finish"]
    assert not any(written for r, written, _ in seen if r != "finish")  # logged before the run ended
    assert {"group_even_global_acc", "group_odd_personalized_acc"} <= set(seen[0][2])


@pytest.mark.slow
def test_unseen_clients_never_train_and_are_reported_apart(make_spec, tmp_path):
    from octomil_sim.runner import run, unseen_clients

    cfg = make_spec(*SMALL, "strategy=ditto", "simulation.rounds=6", "simulation.unseen_clients=0.25",
                   "simulation.fraction_evaluate=0")
    held_out = unseen_clients(cfg)
    assert len(held_out) == 3 and held_out == unseen_clients(cfg)  # drawn by the seed
    results = run(cfg, tmp_path / "run")
    assert results["unseen_clients"]["clients"] == held_out
    assert sorted(c["partition_id"] for c in results["clients"] if c["unseen"]) == held_out
    # Ditto stores a personal model for every client that trained: none for the held-out ones
    trained = {int(p.stem) for p in (tmp_path / "run" / "client_state" / "ditto_v").glob("*.pt")}
    assert trained and not trained & set(held_out)
    unseen = results["unseen_clients"]["final"]
    # a new device personalizes too (one Ditto personal update on its own data from the global model)
    assert unseen["personalized_acc"] > unseen["global_acc"]
    with pytest.raises(ConfigError, match=r"^simulation.unseen_clients=0.9: allowed: a share in \[0, 1\)"):
        validate(make_spec(*SMALL, "simulation.unseen_clients=0.9"))


def test_a_policy_never_extrapolates_scafflixs_average(tmp_path, task_identity):
    """Scafflix's control variates assume the new model is an average of the uploads: a coefficient-step
    policy (bounded group loss, coefficients [0.5, 1.5]) is applied there as normalised weights."""
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"0": "a", "1": "b"}))

    class AverageOnly(BaseWeights):
        average_only = True

    policy = GroupLossBound(str(groups), max_group_loss=1.0, dual_step=0.5, dual_bound=10.0, num_clients=2)
    policy.mu = {"b": 1.0}
    strategy = AverageOnly(fairness=policy)
    strategy.sent = ArrayRecord([np.zeros(1, np.float32)])
    metrics = [{"num-examples": 1, "own-weight": 1.0, "loss_before": 0.5, "partition-id": 0},
               {"num-examples": 1, "own-weight": 1.0, "loss_before": 3.0, "partition-id": 1}]
    arrays, _ = strategy.aggregate_train(1, _replies([[0.0], [2.0]], metrics))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [1.5])  # (0.5 * 0 + 1.5 * 2) / 2, not 3.0
