"""Whole runs through Flower's simulation engine on the Ray backend (a few seconds each)."""

import json

import pytest

from octomil_sim.runner import initial_arrays, run
from octomil_sim.spec import RunSpec

pytestmark = pytest.mark.slow


MEASURED = {"time_s", "driver_rss_mb"}  # wall time and memory: the only numbers a seed does not fix


def _numbers(results: dict) -> tuple:
    drop = lambda d: {k: v for k, v in d.items() if k not in MEASURED}  # noqa: E731
    return [drop(r) for r in results["rounds"]], results["clients"], drop(results["final"])


def test_two_rounds_write_results_plot_and_bytes(make_spec, tmp_path):
    cfg = make_spec("simulation.num_clients=10", "simulation.clients_per_round=3", "simulation.rounds=2",
                   "simulation.fraction_evaluate=0.5", "strategy=finetune")
    results = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["final"] == json.loads(json.dumps(results["final"]))
    assert set(results["final"]["best_round"]["global_acc"]) == {"value", "round"}
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert [c["partition_id"] for c in results["clients"]] == list(range(10))
    model_bytes = initial_arrays(cfg).count_bytes()
    for r in results["rounds"]:
        assert r["bytes_down"] == r["bytes_up"] == 3 * model_bytes  # 3 clients, full model each way
        assert r["num_clients"] == 5  # half the clients evaluated each round
        for key in ("global_acc", "global_acc_bottom10", "global_acc_std", "personalized_acc", "train_loss"):
            assert 0.0 <= r[key] <= (1.0 if "acc" in key else 100.0)
    final = results["final"]
    assert final["bytes_up"] == final["bytes_down"] == 6 * model_bytes
    assert final["bytes_evaluate_down"] == (5 + 5 + 10) * model_bytes
    accs = [c["global_acc"] for c in results["clients"]]
    assert final["global_acc_bottom10"] == pytest.approx(min(accs))  # 10% of 10 clients: the worst one
    weights = [c["num_test"] for c in results["clients"]]
    assert final["global_acc"] == pytest.approx(sum(a * w for a, w in zip(accs, weights)) / sum(weights))


def test_fixed_seed_identical_and_finetuning_beats_fedavg(make_spec, tmp_path):
    """Synthetic(0.5, 0.5): local models differ (alpha), so one global model cannot fit every
    client and fine-tuning it on the client's own data must raise per-client accuracy."""
    common = ["simulation.num_clients=30", "simulation.clients_per_round=10", "simulation.rounds=15",
              "simulation.fraction_evaluate=0"]
    fedavg = run(make_spec("strategy=fedavg", *common), tmp_path / "a")
    again = run(make_spec("strategy=fedavg", *common), tmp_path / "b")
    finetune = run(make_spec("strategy=finetune", *common), tmp_path / "c")

    assert _numbers(fedavg) == _numbers(again)  # fixed seeds, identical numbers
    # fine-tuning never uploads: training, hence the global model, is FedAvg's bit for bit
    assert [c["global_acc"] for c in finetune["clients"]] == [c["global_acc"] for c in fedavg["clients"]]
    assert fedavg["final"]["personalized_acc"] == fedavg["final"]["global_acc"]

    f, p = fedavg["final"], finetune["final"]
    assert p["personalized_acc"] > f["personalized_acc"] + 0.15
    assert p["personalized_acc_bottom10"] > f["personalized_acc_bottom10"]
    better = sum(c["personalized_acc"] >= c["global_acc"] for c in finetune["clients"])
    assert better >= 0.8 * len(finetune["clients"])


@pytest.mark.parametrize(
    "overrides",
    [["experiment=ditto_synthetic"], ["experiment=pfedme_synthetic"], ["experiment=scafflix_synthetic"],
     ["strategy=personal_layers", "model=mlp"]],
    ids=["ditto", "pfedme", "scafflix", "personal_layers"],
)
def test_personalization_beats_fedavg_on_synthetic(make_spec, tmp_path, overrides, fedavg_small):
    """Synthetic(0.5, 0.5) gives every client its own model (alpha) and inputs (beta): a model
    personalized to the client must serve it better than the one global model."""
    model = [o for o in overrides if o.startswith("model=")]
    baseline = fedavg_small(tuple(model))
    result = run(make_spec(*overrides, *SMALL), tmp_path)
    p, f = result["final"], baseline["final"]
    assert p["personalized_acc"] > f["personalized_acc"] + 0.05
    assert p["personalized_acc_bottom10"] > f["personalized_acc_bottom10"]


SMALL = ["simulation.num_clients=30", "simulation.clients_per_round=10", "simulation.rounds=30",
         "simulation.fraction_evaluate=0"]


@pytest.fixture(scope="module")
def fedavg_small(tmp_path_factory):
    """FedAvg on the SMALL setting, one run per model, shared by the comparisons."""
    from hydra import compose, initialize_config_module

    cache: dict = {}

    def get(model: tuple) -> dict:
        if model not in cache:
            with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
                cfg = compose("config", overrides=["strategy=fedavg", *model, *SMALL])
            cache[model] = run(RunSpec.from_config(cfg), tmp_path_factory.mktemp("fedavg"))
        return cache[model]

    return get


def test_tilt_zero_is_fedavg_end_to_end(make_spec, tmp_path, fedavg_small):
    """t = 0 leaves every weight at n_k, so the whole run equals FedAvg's to the last bit; also where
    FedAvg's clients skip measuring loss_before, which nothing on its server reads, and the tilted
    run's clients measure it."""
    tilted = run(make_spec("strategy=tilted", "strategy.server.t=0", *SMALL), tmp_path)
    fedavg = fedavg_small(())
    assert [c["global_acc"] for c in tilted["clients"]] == [c["global_acc"] for c in fedavg["clients"]]
    assert [r["train_loss"] for r in tilted["rounds"]] == [r["train_loss"] for r in fedavg["rounds"]]
    assert all("loss_before" in r for r in tilted["rounds"]) and not any("loss_before" in r for r in fedavg["rounds"])


def test_bounded_group_loss_reports_groups_and_duals(make_spec, tmp_path):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({str(k): "even" if k % 2 == 0 else "odd" for k in range(10)}))
    cfg = make_spec("strategy=bounded_group_loss", f"groups_file={groups}", "strategy.server.max_group_loss=0.5",
                   "simulation.num_clients=10", "simulation.clients_per_round=4", "simulation.rounds=3",
                   "simulation.fraction_evaluate=0")
    results = run(cfg, tmp_path / "run")
    assert set(results["groups"]) == {"even", "odd"}
    assert results["groups"]["even"]["num_clients"] == 5
    bound = results["group_bound"]
    losses = {g: m["global_loss"] for g, m in results["groups"].items()}
    assert bound["holds"] == all(v <= 0.5 for v in losses.values())
    assert any(k.startswith("dual_") for k in results["rounds"][-1])
    # the averaged iterate (the primal-dual method's guarantee is about it) is evaluated and reported too
    averaged = results["averaged_iterate"]
    assert averaged["final"]["num_clients"] == 10 and set(averaged["groups"]) == {"even", "odd"}
    assert averaged["final"]["global_loss"] != results["final"]["global_loss"]  # 3 rounds: not the last iterate
    assert "worst_group_improvement" in results and results["worst_group_improvement"]["group"] in ("even", "odd")
