"""Whole runs for issue 5: batching clients into Flower messages changes no number, a killed run
resumes to identical results, failing and slow clients do not stop a run, FedP3 sends fewer bytes,
prompt tuning keeps the base frozen and personalizes."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from octomil_sim.checkpoint import checkpoint_folders, load_checkpoint
from octomil_sim.runner import run

pytestmark = pytest.mark.slow

MEASURED = {"time_s", "driver_rss_mb"}
SMALL = ["simulation.num_clients=20", "simulation.clients_per_round=6", "simulation.rounds=6",
         "simulation.fraction_evaluate=0.25"]


def _numbers(results: dict) -> tuple:
    drop = lambda d: {k: v for k, v in d.items() if k not in MEASURED}  # noqa: E731
    return [drop(r) for r in results["rounds"]], results["clients"], drop(results["final"])


def test_clients_per_message_change_no_number(make_spec, tmp_path):
    one = run(make_spec("strategy=ditto", "simulation.num_nodes=1", *SMALL), tmp_path / "one")
    five = run(make_spec("strategy=ditto", "simulation.num_nodes=5", *SMALL), tmp_path / "five")
    assert _numbers(one) == _numbers(five)


@pytest.mark.parametrize("algorithm", ["scafflix", "bounded_group_loss"])
def test_resume_from_checkpoint_equals_uninterrupted(make_spec, tmp_path, caplog, algorithm):
    """Scafflix keeps x_i* and h_i in the client-state store and draws L per round; bounded group
    loss carries its duals and averaged model in its round_state. Run 3 rounds, then ask the same
    run dir for 6: the result must equal 6 rounds in one go, the resumption says where it starts,
    and wall_time_s adds the first run's time (up to its checkpoint) to the second's."""
    common = ["simulation.checkpoint_every=2", *SMALL[:2], "simulation.fraction_evaluate=0.25"]
    if algorithm == "scafflix":
        common.append("experiment=scafflix_synthetic")
    else:
        groups = tmp_path / "groups.json"
        groups.write_text(json.dumps({str(k): "even" if k % 2 == 0 else "odd" for k in range(20)}))
        common += ["strategy=bounded_group_loss", f"groups_file={groups}", "strategy.server.max_group_loss=0.5"]
    straight = run(make_spec(*common, "simulation.rounds=6"), tmp_path / "straight")
    run(make_spec(*common, "simulation.rounds=3"), tmp_path / "resumed")
    folder, saved = load_checkpoint(tmp_path / "resumed")
    assert saved["round"] == 3 and saved["config"]["simulation"]["rounds"] == 3
    began = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="octomil_sim.runner"):
        resumed = run(make_spec(*common, "simulation.rounds=6"), tmp_path / "resumed")
    second_part = time.perf_counter() - began
    assert _numbers(resumed) == _numbers(straight)
    assert resumed.get("averaged_iterate") == straight.get("averaged_iterate")
    assert f"resuming from round 3 ({folder})" in caplog.messages
    assert second_part < resumed["wall_time_s"] <= saved["wall_time_s"] + second_part
    assert [f.name for f in checkpoint_folders(tmp_path / "resumed")] == ["round_000006", "round_000004"]


def test_killed_run_resumes_to_identical_results(tmp_path):
    """SIGKILL the whole process group once round 4's checkpoint exists, rerun the same command
    (heterogeneous clients, so dropouts and stragglers must also come out the same)."""
    args = [sys.executable, "-m", "octomil_sim", "strategy=ditto", "system=heterogeneous", "system.deadline=20",
            "simulation.num_clients=20",
            "simulation.clients_per_round=6", "simulation.rounds=8", "simulation.checkpoint_every=2",
            "simulation.fraction_evaluate=0", "progress=false"]
    straight = tmp_path / "straight"
    subprocess.run([*args, f"hydra.run.dir={straight}"], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"hydra.run.dir={killed}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(f.name >= "round_000004" for f in checkpoint_folders(killed)):
            break
        time.sleep(0.05)
    was_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert was_running and not (killed / "results.json").exists()
    rerun = subprocess.run([*args, f"hydra.run.dir={killed}"], check=True, capture_output=True, text=True)
    assert re.search(r"resuming from round [4-8] \(.*round_00000[4-8]\)", rerun.stdout + rerun.stderr)
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    assert _numbers(a) == _numbers(b)
    assert a["system"] == b["system"] and a["system"]["failed_rounds"] > 0


def test_heterogeneous_clients_fail_and_straggle_but_the_run_finishes(make_spec, tmp_path):
    results = run(make_spec("system=heterogeneous", "system.deadline=20", "simulation.clients_per_round=10",
                           *SMALL[:1], "simulation.rounds=8", "simulation.fraction_evaluate=0"), tmp_path)
    system = results["system"]
    assert system["failed_rounds"] > 0 and system["straggler_rounds"] > 0
    assert set(system["failed_by_class"]) <= {"low", "mid"}  # the high class never drops out
    assert set(system["stragglers_by_class"]) <= {"mid", "high"}  # low: 5 steps / 0.25 = 20, on time
    assert all("dropped out" in r for r in system["last_failure_reason"].values())
    per_round = results["rounds"]
    assert sum(r["failed_clients"] for r in per_round) == system["failed_rounds"]
    assert sum(r["stragglers"] for r in per_round) == system["straggler_rounds"]
    # the uploads of the clients that answered in time, and only those, were counted
    assert all(r["bytes_up"] < r["bytes_down"] for r in per_round if r["failed_clients"] + r["stragglers"])
    assert len(results["clients"]) == 20 and results["final"]["global_acc"] > 0.2


def test_fedp3_sends_fewer_bytes_and_personalizes(make_spec, tmp_path):
    common = ["model=mlp", "model.net.hidden=[64,64]", "simulation.num_clients=20",
              "simulation.clients_per_round=10", "simulation.rounds=15", "simulation.fraction_evaluate=0"]
    fedavg = run(make_spec("strategy=fedavg", *common), tmp_path / "fedavg")
    fedp3 = run(make_spec("strategy=fedp3", "strategy.server.global_keep=0.3",
                         "strategy.server.upload_layers=1", *common), tmp_path / "fedp3")
    f, p = fedavg["final"], fedp3["final"]
    # MLP 60-64-64-10: a client uploads one hidden layer and the head (at most 4,810 of 8,970 numbers);
    # the hidden layer it keeps home comes down pruned to 30% plus a bit mask (at most ~7,300 of 8,970)
    assert p["bytes_down"] < 0.85 * f["bytes_down"]
    assert p["bytes_up"] < 0.6 * f["bytes_up"]
    assert p["personalized_acc"] > f["personalized_acc"] + 0.05


def test_prompt_tuning_keeps_base_frozen_and_beats_the_shared_model(make_spec, tmp_path):
    common = ["dataset=synthetic_tokens", "model=prompt_transformer", "simulation.num_clients=20",
              "simulation.clients_per_round=10", "simulation.rounds=15", "simulation.fraction_evaluate=0",
              "simulation.lr=0.1"]
    cfg = make_spec("strategy=prompt_tuning", *common)
    results = run(cfg, tmp_path)
    from octomil_sim.runner import initial_arrays

    init = initial_arrays(cfg).to_torch_state_dict()
    base_bytes = sum(t.numel() * 4 for k, t in init.items() if k.startswith("base."))
    head_bytes = sum(t.numel() * 4 for k, t in init.items() if k.startswith("head."))
    # clients upload the head only: never the frozen base nor their prompts
    assert results["final"]["bytes_up"] < 2 * 10 * 15 * head_bytes < base_bytes * 10 * 15
    prompts = [torch.load(tmp_path / "client_state" / "local_layers" / f"{c}.pt")["prompt"]
               for c in range(2) if (tmp_path / "client_state" / "local_layers" / f"{c}.pt").exists()]
    assert prompts and all(p.shape == (4, 32) for p in prompts)
    final = load_checkpoint(tmp_path)[1]["arrays"]
    assert all(torch.equal(final[k], t) for k, t in init.items() if k.startswith("base."))  # frozen
    assert not torch.equal(final["head.weight"], init["head.weight"])
    f = results["final"]
    assert f["personalized_acc"] > f["global_acc"] + 0.05
