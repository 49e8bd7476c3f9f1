"""Group models (strategies/hierarchical.py): hierarchical personalization, IFCA, per-task heads."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from helpers import one_example_task, train_reply
from octomil_sim.data import grouped_clients, sklearn_digits
from octomil_sim.errors import ConfigError
from octomil_sim.models import MLP, MLR
from strategies import hierarchical as h
from strategies.fedavg import FedAvgClient


def test_expand_select_rename_by_hand():
    state = {"body": torch.tensor([1.0]), "head": torch.tensor([2.0])}
    other = {"body": torch.tensor([10.0]), "head": torch.tensor([20.0])}
    record = h.expand(state, [state, other], ("head",))
    assert list(record) == ["body", "group0.head", "group1.head"]
    assert record["group1.head"].item() == 20.0 and record["body"].item() == 1.0  # the body is shared
    assert h.select(record, 1) == {"body": record["body"], "head": record["group1.head"]}
    whole = h.expand(state, [state, other], None)
    assert set(whole) == {"group0.body", "group0.head", "group1.body", "group1.head"}
    assert h.select(whole, 1) == {"body": other["body"], "head": other["head"]}
    assert h.rename_upload({"body": 1, "head": 2}, 3, ("head",)) == {"body": 1, "group3.head": 2}
    assert h.select({"groupnorm.w": 5, "group0.x": 6}, 0) == {"groupnorm.w": 5, "x": 6}  # not a group key


def test_keywise_average_by_hand():
    uploads = [{"a": torch.tensor(1.0), "group0.h": torch.tensor(2.0)},
               {"a": torch.tensor(3.0), "group1.h": torch.tensor(4.0)},
               {"a": torch.tensor(5.0), "group0.h": torch.tensor(6.0)}]
    out = h.keywise_average(uploads, [1.0, 1.0, 2.0])
    assert out["a"].item() == pytest.approx((1 + 3 + 10) / 4)
    assert out["group0.h"].item() == pytest.approx((2 + 12) / 3)
    assert out["group1.h"].item() == 4.0


def test_ifca_picks_the_lowest_loss_first_on_ties():
    assert h.ifca_group([0.5, 0.2, 0.9]) == 1 and h.ifca_group([0.3, 0.3]) == 0


def test_server_averages_each_group_over_its_clients_and_keeps_the_rest(task_identity, tmp_path):
    groups = h.write_groups(tmp_path / "g.json", 4, ["a", "b"])
    server = h.GroupModels(groups_file=str(groups), group_layers=["head"])
    server.sent = ArrayRecord({"body": torch.zeros(1), "group0.head": torch.zeros(1), "group1.head": torch.full((1,), 9.0)})
    replies = [train_reply({"body": torch.tensor([1.0]), "group0.head": torch.tensor([2.0])}, {"num-examples": 1}),
               train_reply({"body": torch.tensor([3.0]), "group0.head": torch.tensor([4.0])}, {"num-examples": 3})]
    arrays, _ = server.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    assert got["body"].item() == pytest.approx(2.5) and got["group0.head"].item() == pytest.approx(3.5)
    assert got["group1.head"].item() == 9.0  # no client of group 1 this round


def test_a_coefficient_step_moves_each_array_by_its_own_uploaders_coefficients(task_identity, tmp_path):
    from strategies.fedavg import FairnessPolicy

    class Coefficients(FairnessPolicy):  # c_k given: a coefficient step w + sum_k c_k (w_k - w)
        coefficient_step = True

        def weights(self, server_round, metrics, base, update_norms=None):
            return [0.25, 0.25]

    groups = h.write_groups(tmp_path / "g.json", 4, ["a", "b"])
    server = h.GroupModels(groups_file=str(groups), group_layers=["head"], fairness=Coefficients())
    server.sent = ArrayRecord({"body": torch.zeros(1), "group0.head": torch.zeros(1), "group1.head": torch.zeros(1)})
    replies = [train_reply({"body": torch.tensor([4.0]), "group0.head": torch.tensor([4.0])}, {"num-examples": 1}),
               train_reply({"body": torch.tensor([8.0]), "group1.head": torch.tensor([8.0])}, {"num-examples": 1})]
    got = server.aggregate_train(1, replies)[0].to_torch_state_dict()
    # body: 0.25 * 4 + 0.25 * 8 = 3; each head only its own client's coefficient: 0.25 * 4 = 1, 0.25 * 8 = 2
    assert [got[k].item() for k in ("body", "group0.head", "group1.head")] == pytest.approx([3.0, 1.0, 2.0])


def test_client_uses_its_groups_model_and_uploads_under_the_groups_names(tmp_path):
    groups = h.write_groups(tmp_path / "g.json", 2, ["a", "b"])
    client = h.GroupClient(FedAvgClient(), groups_file=str(groups))
    zero, one = MLR((2,), 3), MLR((2,), 3)
    for p in zero.parameters():
        torch.nn.init.zeros_(p)
    for p in one.parameters():
        torch.nn.init.ones_(p)
    record = ArrayRecord(h.expand(zero.state_dict(), [zero.state_dict(), one.state_dict()], None))
    task = one_example_task(client_id=1)
    model = client.load(MLR((2,), 3), record, task)
    assert torch.equal(model.fc.weight, torch.ones(3, 2))  # client 1 is in group "b" = 1
    upload, metrics = client.train(model, task)
    assert set(upload) == {"group1.fc.weight", "group1.fc.bias"} and metrics[h.GROUP] == 1
    assert client.report(model, task) == {h.GROUP: 1}


def test_ifca_client_picks_the_model_that_fits_its_data():
    client = h.GroupClient(FedAvgClient(), assignment="loss", num_groups=2)
    task = one_example_task()  # x = [1, 2], y = 0
    wrong, right = MLR((2,), 3), MLR((2,), 3)
    with torch.no_grad():
        for model, label in ((wrong, 2), (right, 0)):
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 3) * 5.0)
    record = ArrayRecord(h.expand(wrong.state_dict(), [wrong.state_dict(), right.state_dict()], None))
    client.load(MLR((2,), 3), record, task)
    assert task.received[h.GROUP] == 1


def test_bad_group_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="assignment='groups_file' needs groups_file"):
        h.GroupClient(FedAvgClient())
    with pytest.raises(ConfigError, match="num_groups=None: allowed: an integer >= 1"):
        h.GroupModels(assignment="loss")
    groups = h.write_groups(tmp_path / "g.json", 4, ["a", "b"])
    with pytest.raises(ConfigError, match="num_groups=3: the groups file names 2 groups"):
        h.GroupModels(groups_file=str(groups), num_groups=3)
    with pytest.raises(ConfigError, match="group_layers=\\['tail'\\]: names no layer"):
        h.GroupClient(FedAvgClient(), groups_file=str(groups), group_layers=["tail"]).check(MLP((4,), 2))
    from strategies.fedp3 import FedP3Client

    with pytest.raises(ConfigError, match="inner=FedP3Client: receives models in its own format"):
        h.GroupClient(FedP3Client(), groups_file=str(groups))
    with pytest.raises(ConfigError, match="num_groups=5 with transform='rotate'"):
        grouped_clients(sklearn_digits(), 10, num_groups=5)
    with pytest.raises(ConfigError, match="transform='blur'"):
        grouped_clients(sklearn_digits(), 4, transform="blur")
    with pytest.raises(ConfigError, match="tasks=\\['digit'\\]"):
        grouped_clients(sklearn_digits(), 4, num_groups=2, transform="tasks", tasks=["digit"])


def test_label_skew_deals_each_class_unevenly_and_keeps_every_client_fed():
    even = grouped_clients(sklearn_digits(), 20, seed=0).with_format("numpy")[:]
    skew = grouped_clients(sklearn_digits(), 20, label_skew=0.3, min_rows=15, seed=0).with_format("numpy")[:]
    assert np.bincount(skew["client_id"]).min() >= 15 and sorted(skew["y"].tolist()) == sorted(even["y"].tolist())

    def top_share(d):  # the share of a client's rows in its most frequent class, mean over clients
        return np.mean([np.bincount(d["y"][d["client_id"] == k]).max() / (d["client_id"] == k).sum() for k in range(20)])

    assert top_share(skew) > top_share(even) + 0.2
    with pytest.raises(ConfigError, match="label_skew=0"):
        grouped_clients(sklearn_digits(), 4, label_skew=0)


def test_grouped_digits_rotate_the_images_and_relabel_the_tasks():
    base = sklearn_digits()
    rotated = grouped_clients(base, 8, num_groups=4, transform="rotate", seed=0).with_format("numpy")[:]
    original = {tuple(r): y for r, y in zip(np.asarray(base.with_format("numpy")[:]["x"]), base["y"])}
    for k in range(8):
        rows = rotated["client_id"] == k
        x = rotated["x"][rows][0].reshape(8, 8)
        back = np.rot90(x, k=-(k % 4)).reshape(-1)  # undo group k % 4's rotation: a row of the base data
        assert original[tuple(back)] == rotated["y"][rows][0]
    tasks = grouped_clients(base, 6, num_groups=3, transform="tasks", tasks=["digit", "parity", "high"], seed=0)
    t = tasks.with_format("numpy")[:]
    assert set(t["y"][t["client_id"] % 3 == 1]) == {0, 1} and set(t["y"][t["client_id"] % 3 == 0]) == set(range(10))
    assert len(t["y"]) == len(base) and json.dumps(sorted(set(t["client_id"].tolist()))) == json.dumps(list(range(6)))


@pytest.mark.slow
def test_group_models_beat_one_global_model_when_groups_differ(make_spec, tmp_path):
    """Rotated digit groups: one model per group fits every group; one global model must average four
    incompatible tasks (IFCA's motivation)."""
    from octomil_sim.runner import run

    groups = h.write_groups(tmp_path / "g.json", 20, [f"g{i}" for i in range(4)])
    base = ["dataset=digits_groups", "partition=natural_id", "model=mlp", "simulation.num_clients=20",
            "simulation.clients_per_round=10", "simulation.rounds=40", "simulation.fraction_evaluate=0.0",
            f"groups_file={groups}", "progress=false"]
    single = run(make_spec(*base, "strategy=finetune"), tmp_path / "single")
    grouped = run(make_spec(*base, "strategy=hierarchical"), tmp_path / "grouped")
    assert grouped["final"]["global_acc"] > single["final"]["global_acc"] + 0.1
    assert {c["group"] for c in grouped["clients"]} == {0, 1, 2, 3}
    assert all(c["group"] == c["partition_id"] % 4 for c in grouped["clients"])
    tasks = run(make_spec(*base, "strategy=multitask", "dataset.source.transform=tasks", "dataset.source.num_groups=2",
                          "dataset.source.tasks=[digit,parity]", f"groups_file={h.write_groups(tmp_path / 't.json', 20, ['digit', 'parity'])}"),
                tmp_path / "tasks")
    assert set(tasks["groups"]) == {"digit", "parity"} and tasks["groups"]["parity"]["global_acc"] > 0.7


def test_group_models_compose_with_ditto(tmp_path):
    """Group + device with Ditto as the device level: the group's model trains as Ditto's global one and
    the personal model it keeps is anchored at the group's model."""
    from strategies.ditto import PERSONAL, DittoClient

    groups = h.write_groups(tmp_path / "g.json", 2, ["a", "b"])
    client = h.GroupClient(DittoClient(lam=1.0), groups_file=str(groups))
    zero = MLR((2,), 3)
    record = ArrayRecord(h.expand(zero.state_dict(), [zero.state_dict(), zero.state_dict()], None))
    task = one_example_task(client_id=0)
    upload, metrics = client.train(client.load(MLR((2,), 3), record, task), task)
    assert set(upload) == {"group0.fc.weight", "group0.fc.bias"} and metrics[h.GROUP] == 0
    assert task.state.load(PERSONAL) is not None  # the device-level personal model, kept on the client
