"""Differential privacy (strategies/dp.py): clipping, equal weights, noise, accounting, DP-SGD."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from helpers import one_example_task, train_reply
from octomil_sim.errors import ConfigError
from octomil_sim.models import MLP, MLR
from octomil_sim.state import MemoryStateStore
from octomil_sim.training import sgd_epochs
from strategies import dp
from strategies.fedavg import FedAvg
from strategies.personal_layers import PartialUpload


def wrap(inner=None, **kwargs):
    options = dict(epsilon=None, noise_multiplier=0.0, clipping_norm=1.0, num_clients=20, clients_per_round=2,
                   rounds=10, seed=0)
    options.update(kwargs)
    return dp.ClientLevelDP(inner or FedAvg(), **options)


def test_flat_clipping_by_hand():
    # update (3, 4) has norm 5: clipped to norm 1 it is (0.6, 0.8), added back to the received (1, 1)
    upload, received = {"w": torch.tensor([4.0, 5.0])}, {"w": torch.tensor([1.0, 1.0])}
    clipped, was = dp.clip_upload(upload, received, 1.0)
    assert was and torch.allclose(clipped["w"], torch.tensor([1.6, 1.8]))
    same, was = dp.clip_upload(upload, received, 10.0)
    assert not was and torch.equal(same["w"], upload["w"])
    zero, was = dp.clip_upload(received, received, 1.0)  # a client that did not move: no division by zero
    assert not was and torch.equal(zero["w"], received["w"])
    assert dp.clip_scale(5.0, 1.0) == 0.2 and dp.clip_scale(0.0, 1.0) == 1.0


def test_accountant_spends_what_the_noise_was_chosen_for():
    z = dp.noise_for_epsilon(4.0, 1e-3, 0.1, 100)
    spent = dp.spent_epsilon([(z, 0.1, 100)], 1e-3)
    assert 3.8 < spent <= 4.0
    assert dp.spent_epsilon([(z, 0.1, 50)], 1e-3) < spent  # fewer releases, less spent
    assert dp.noise_for_epsilon(1.0, 1e-3, 0.1, 100) > z  # a smaller budget needs more noise
    assert dp.spent_epsilon([(0.0, 0.1, 1)], 1e-3) == math.inf and dp.spent_epsilon([], 1e-3) == 0.0


def test_server_clipping_averages_with_equal_weights_and_leaves_personal_layers_alone(task_identity):
    inner = PartialUpload()
    inner.sent = ArrayRecord({"body": torch.zeros(2), "head": torch.full((1,), 7.0)})
    strategy = wrap(inner)
    replies = [train_reply({"body": torch.tensor([3.0, 4.0])}, {"num-examples": 1}),
               train_reply({"body": torch.tensor([0.1, 0.0])}, {"num-examples": 100})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # clipped updates (0.6, 0.8) and (0.1, 0); equal weights: (0.35, 0.4) (num-examples would give ~(0.105, 0.008))
    assert torch.allclose(torch.from_numpy(arrays["body"].numpy()), torch.tensor([0.35, 0.4]))
    assert float(arrays["head"].numpy()[0]) == 7.0  # not uploaded: neither clipped nor noised
    assert metrics[dp.EPSILON] == math.inf  # noiseless releases spend everything


def test_a_missing_client_counts_as_a_zero_update_fixed_denominator(task_identity):
    inner = FedAvg()
    inner.sent = ArrayRecord({"w": torch.zeros(2)})
    strategy = wrap(inner, clients_per_round=2)
    from flwr.app import Error, Message, MessageType, RecordDict

    ins = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=2)
    failed = Message(Error(0, "dropped"), reply_to=ins)
    arrays, _ = strategy.aggregate_train(1, [train_reply({"w": torch.tensor([0.6, 0.8])}, {"num-examples": 1}), failed])
    assert torch.allclose(torch.from_numpy(arrays["w"].numpy()), torch.tensor([0.3, 0.4]))  # (0.6, 0.8) / m, m = 2
    assert strategy.privacy_report()["releases"] == 1


def test_a_longer_server_step_gets_more_noise_and_other_aggregators_are_refused(task_identity):
    from strategies.pfedme import PFedMe
    from strategies.qffl import QFFL

    inner = PFedMe(beta=2.0)
    inner.sent = ArrayRecord({"w": torch.zeros(20000)})
    strategy = wrap(inner, noise_multiplier=1.0, clipping_norm=1.0)
    arrays, _ = strategy.aggregate_train(1, [train_reply({"w": torch.zeros(20000)}, {"num-examples": 1})] * 2)
    assert abs(float(torch.from_numpy(arrays["w"].numpy()).std()) - 2.0 * 1.0 / 2) < 0.02  # beta z C / m
    with pytest.raises(ConfigError, match="QFFL does not average"):
        wrap(QFFL(client_learning_rate=0.1))


def test_epsilon_composes_the_releases_of_a_resumed_run_at_their_own_noise(task_identity):
    strategy = wrap(noise_multiplier=1.0)
    strategy.history = [[2.0, 0.1, 30]]  # saved by a run whose z was 2 (fewer rounds asked for)
    strategy._account(ArrayRecord({"w": torch.zeros(1)}), None)
    assert strategy.history == [[2.0, 0.1, 30], [1.0, 0.1, 1]] and strategy.rounds_done == 31
    assert strategy.epsilon() == pytest.approx(dp.spent_epsilon([(2.0, 0.1, 30), (1.0, 0.1, 1)], 1e-3))
    assert "history" in strategy.round_state
    strategy.rounds_done = 12  # a checkpoint from before the history: its count, at this run's noise
    assert strategy.history == [[1.0, 0.1, 12]]


def test_adaptive_clipping_with_no_reply_releases_nothing(task_identity):
    strategy = wrap(clipping="server_adaptive", noise_multiplier=0.5, clipped_count_stddev=0.5)
    strategy.strategy.sent = ArrayRecord({"w": torch.zeros(2)})
    assert strategy.aggregate_train(1, [])[0] is None and strategy.clipping_norm == 1.0 and strategy.history == []


def test_noise_is_seeded_scaled_and_only_on_uploaded_arrays(task_identity):
    def aggregate(seed, server_round):
        inner = PartialUpload()
        inner.sent = ArrayRecord({"body": torch.zeros(20000), "head": torch.zeros(3)})
        strategy = wrap(inner, noise_multiplier=2.0, clipping_norm=0.5, seed=seed)
        replies = [train_reply({"body": torch.zeros(20000)}, {"num-examples": 5}) for _ in range(2)]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        return torch.from_numpy(arrays["body"].numpy()), torch.from_numpy(arrays["head"].numpy()), metrics

    body, head, metrics = aggregate(0, 1)
    assert torch.equal(head, torch.zeros(3))
    assert abs(float(body.std()) - 2.0 * 0.5 / 2) < 0.02  # z C / m
    assert torch.equal(body, aggregate(0, 1)[0])  # fixed seed, same noise
    assert not torch.equal(body, aggregate(0, 2)[0]) and not torch.equal(body, aggregate(1, 1)[0])
    assert 0 < metrics[dp.EPSILON] < math.inf


def test_client_side_clipping_sends_the_norm_and_clips_on_the_client(task_identity):
    strategy = wrap(clipping="client_fixed", clipping_norm=0.25)

    class Grid:
        def get_node_ids(self):
            return list(range(20))

    messages = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), Grid()))
    assert messages and all(m.content["config"]["clipping_norm"] == 0.25 for m in messages)
    task = one_example_task(config={"clipping_norm": 0.25})
    upload, extra = dp.UploadClipping().upload({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, task)
    assert extra == {dp.CLIPPED: 1} and torch.allclose(upload["w"], torch.tensor([0.15, 0.2]))
    plain, extra = dp.UploadClipping().upload({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, one_example_task())
    assert extra == {} and torch.equal(plain["w"], torch.tensor([3.0, 4.0]))


def test_adaptive_clipping_moves_the_norm_toward_the_quantile(task_identity):
    strategy = wrap(clipping="server_adaptive", noise_multiplier=0.5, clipping_norm=1.0, clipped_count_stddev=0.5,
                    clip_norm_lr=0.2, target_quantile=0.5)
    strategy.strategy.sent = ArrayRecord({"w": torch.zeros(2)})
    big = [train_reply({"w": torch.tensor([30.0, 40.0])}, {"num-examples": 1}) for _ in range(2)]
    strategy.aggregate_train(1, big)
    assert strategy.clipping_norm > 1.0  # every update was clipped: the norm grows (Flower's own would shrink it)
    small = [train_reply({"w": torch.tensor([0.01, 0.0])}, {"num-examples": 1}) for _ in range(2)]
    grown = strategy.clipping_norm
    strategy.strategy.sent = ArrayRecord({"w": torch.zeros(2)})
    strategy.aggregate_train(2, small)
    assert strategy.clipping_norm < grown  # none clipped: it shrinks
    assert strategy.privacy_report()["noise_multiplier"] == 0.5 and "strategy.sent" not in strategy.round_state
    assert "clipping_norm" in strategy.round_state


def test_client_side_adaptive_clipping_reads_the_clients_clipped_flags(task_identity):
    strategy = wrap(clipping="client_adaptive", noise_multiplier=0.5, clipping_norm=1.0, clipped_count_stddev=0.5)

    class Grid:
        def get_node_ids(self):
            return list(range(20))

    messages = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), Grid()))
    assert all(m.content["config"]["clipping_norm"] == 1.0 for m in messages)
    clipped = [train_reply({"w": torch.tensor([0.6, 0.8])}, {"num-examples": 1, dp.CLIPPED: 1}) for _ in range(2)]
    strategy.aggregate_train(1, clipped)
    assert strategy.clipping_norm > 1.0  # both clipped: the norm grows
    kept = [train_reply({"w": torch.tensor([0.01, 0.0])}, {"num-examples": 1, dp.CLIPPED: 0}) for _ in range(2)]
    grown = strategy.clipping_norm
    strategy.aggregate_train(2, kept)
    assert strategy.clipping_norm < grown and strategy.rounds_done == 2


def test_dp_sgd_without_noise_or_clipping_is_plain_sgd_and_counts_its_steps():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    a = MLR((5,), 3)
    b = MLR((5,), 3)
    b.load_state_dict(a.state_dict())
    sgd_epochs(a, x, y, epochs=2, batch_size=10, lr=0.1, generator=torch.Generator().manual_seed(1))
    state = MemoryStateStore().bind(0)
    private = dp.DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, max_trainings=3)
    private.sgd_epochs(b, x, y, epochs=2, batch_size=10, lr=0.1, generator=torch.Generator().manual_seed(1), state=state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not hasattr(b.fc.weight, "grad_sample") or b.fc.weight.grad_sample is None  # Opacus's hooks are gone
    assert private.history(state) == [(0.0, 0.25, 8)] and private.report(state)[dp.EPSILON] == math.inf


def test_dp_sgd_calibrates_to_the_steps_a_training_takes_and_skips_what_stays_home():
    from dataclasses import replace

    from strategies.personal_layers import PersonalLayersClient

    private = dp.DPSGD(epsilon=4.0, max_trainings=10)
    assert private.noise(40, 20, 20) > private.noise(40, 20, 2)  # local_steps=20: ten times the steps
    model = MLP((2,), 3, hidden=(4,))
    task = replace(one_example_task(), private=private)
    PersonalLayersClient(local_layers=["head"], head_epochs=3).train(model, task)
    assert [steps for _, _, steps in private.history(task.state)] == [1]  # the body's step only (FedRep's head: no DP)


def test_dp_sgd_clips_and_adds_noise_and_its_epsilon_is_at_most_the_target():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5) * 10, torch.randint(0, 3, (40,))
    start = MLR((5,), 3)
    plain, private_model = MLR((5,), 3), MLR((5,), 3)
    plain.load_state_dict(start.state_dict())
    private_model.load_state_dict(start.state_dict())
    sgd_epochs(plain, x, y, epochs=1, batch_size=10, lr=0.1, generator=torch.Generator().manual_seed(1))
    state = MemoryStateStore().bind(0)
    private = dp.DPSGD(epsilon=4.0, delta=1e-3, max_grad_norm=0.1, max_trainings=5)
    for _ in range(5):  # as many trainings as it may take: epsilon reaches, never passes, the target
        private.sgd_epochs(private_model, x, y, epochs=1, batch_size=10, lr=0.1,
                           generator=torch.Generator().manual_seed(1), state=state)
    assert not torch.allclose(plain.fc.weight, private_model.fc.weight, atol=1e-3)
    assert 3.0 < private.report(state)[dp.EPSILON] <= 4.0 + 1e-6


@pytest.mark.parametrize("overrides, message", [
    (["privacy=client_level", "fairness=tilted"], "weights its clients unequally"),
    (["privacy=client_level", "strategy=scafflix"], "weights its clients unequally"),
    (["privacy=client_level", "strategy=fedp3", "model=mlp"], "upload different arrays"),
    (["privacy=client_level", "privacy.server.clipping=bogus"], "privacy.server.clipping='bogus': allowed"),
    (["privacy=client_level", "privacy.server.noise_multiplier=1.0"], "exactly one of the two"),
    (["privacy=client_level", "privacy.server.delta=2"], "privacy.server.delta=2"),
    (["privacy=client_level", "privacy.server.clipping=server_adaptive", "privacy.server.epsilon=0.5"],
     "privacy.server.clipped_count_stddev"),
    (["privacy=client_level", "++strategy.server.sampling=size_proportional"], "uniform client sampling"),
    (["privacy=dp_sgd", "strategy=pfedme"], "privacy=dp_sgd: strategy.client=PFedMeClient"),
    (["privacy=dp_sgd", "privacy.client.max_grad_norm=0"], "privacy.client.max_grad_norm=0"),
    (["privacy=dp_sgd", "privacy.client.delta=0"], "privacy.client.delta=0"),
    (["privacy=dp_sgd", "privacy.client.epsilon=1e-9"], "privacy.client.epsilon=1e-09"),
    (["privacy=client_level", "privacy.server.epsilon=1e-9"], "privacy.server.epsilon=1e-09"),
    (["privacy=client_level", "privacy.server.clipping=server_adaptive", "privacy.server.target_quantile=2"],
     "privacy.server.target_quantile=2"),
])
def test_bad_privacy_settings_are_one_line_errors_before_anything_runs(make_spec, overrides, message):
    from octomil_sim.config import validate

    with pytest.raises(ConfigError) as err:
        validate(make_spec(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_private_run_reports_its_epsilon_and_personalization_recovers_accuracy(make_spec, tmp_path):
    from octomil_sim.runner import run

    base = ["model=mlp", "simulation.rounds=20", "simulation.num_clients=20", "simulation.clients_per_round=5",
            "simulation.fraction_evaluate=0.0", "progress=false"]
    private = run(make_spec(*base, "privacy=client_level", "privacy.server.epsilon=1"), tmp_path / "dp")
    again = run(make_spec(*base, "privacy=client_level", "privacy.server.epsilon=1"), tmp_path / "dp2")
    report = private["privacy"]
    assert report["releases"] == 20 and 0.9 < report["epsilon"] <= 1.0 and report["noise_multiplier"] > 1
    assert [r["epsilon"] for r in private["rounds"]] == sorted(r["epsilon"] for r in private["rounds"])
    assert private["final"] == {**again["final"], "driver_rss_mb": private["final"]["driver_rss_mb"]}  # seeded
    final = private["final"]
    assert final["personalized_acc"] > final["global_acc"] + 0.2  # fine-tuning recovers what the noise cost
    saved = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert saved["privacy"]["accountant"] == "opacus.accountants.RDPAccountant"


@pytest.mark.slow
def test_dp_sgd_run_reports_each_clients_epsilon(make_spec, tmp_path):
    from octomil_sim.runner import run

    out = run(make_spec("privacy=dp_sgd", "privacy.client.epsilon=2", "simulation.rounds=3", "simulation.num_clients=10",
                        "simulation.clients_per_round=5", "progress=false"), tmp_path / "run")
    spent = [c["epsilon"] for c in out["clients"]]
    assert max(spent) <= 2.0 + 1e-6 and any(e > 0 for e in spent)
    assert out["privacy"]["level"] == "sample" and out["privacy"]["epsilon_max"] == max(spent)
