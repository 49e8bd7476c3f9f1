"""``-m`` sweeps whose jobs run side by side (issue 12, goal 5): Hydra's joblib launcher, each job's
private Ray instance sized to its share of the CPUs so that the jobs' actors never outnumber the cores."""

import json
import os
import subprocess
import sys

import pytest

from octomil_sim.__main__ import check_parallel_jobs, share_cpus
from octomil_sim.cli import train_overrides
from octomil_sim.config import num_nodes
from octomil_sim.errors import ConfigError

SMALL = ["simulation.num_clients=8", "simulation.clients_per_round=4", "simulation.rounds=3",
         "simulation.checkpoint_every=0", "progress=false", "strategy=fedavg"]


def test_the_number_of_parallel_jobs_is_checked_before_anything_starts():
    cpus = os.cpu_count()
    assert check_parallel_jobs(["-m", "hydra/launcher=joblib"])[-1] == f"hydra.launcher.n_jobs={cpus}"
    assert check_parallel_jobs(["simulation.seed=0,1"]) == ["simulation.seed=0,1"]  # the basic launcher
    with pytest.raises(ConfigError, match=rf"^hydra.launcher.n_jobs={cpus + 1}: allowed: 1..{cpus} "):
        check_parallel_jobs(["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={cpus + 1}"])


def test_train_jobs_flag_is_a_joblib_sweep():
    assert train_overrides(["--jobs", "2", "simulation.seed=0,1"], cwd=None) == [
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "simulation.seed=0,1"]


def test_each_job_gets_its_share_of_the_cpus(make_spec, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    spec = make_spec()
    assert share_cpus(spec, 1) is spec
    assert share_cpus(spec, 2).simulation.ray_num_cpus == 4
    assert share_cpus(make_spec("simulation.ray_num_cpus=1"), 2).simulation.ray_num_cpus == 1  # set by the user
    assert share_cpus(make_spec("simulation.ray_address=auto"), 2).simulation.ray_num_cpus is None  # a cluster
    # each job keeps the Flower nodes it has alone (so its clients share messages as alone), or those set,
    # or, resuming, its checkpoint's (``runner.resume_point``)
    assert share_cpus(spec, 2).simulation.num_nodes == num_nodes(spec) == 8
    assert share_cpus(make_spec("simulation.num_nodes=3"), 2).simulation.num_nodes == 3
    assert share_cpus(spec, 2, resuming=True).simulation.num_nodes is None


def test_a_job_whose_share_is_one_client_process_runs_its_clients_in_its_own_process(make_spec, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    spec = make_spec()
    four, one = share_cpus(spec, 2).simulation, share_cpus(spec, 8).simulation
    assert (four.backend, four.ray_num_cpus, four.num_nodes) == ("ray", 4, 8)
    assert (one.backend, one.ray_num_cpus, one.num_nodes) == ("local", None, 8)  # the same nodes: the same numbers
    two_cpus = make_spec("simulation.num_cpus_per_client=2")
    assert share_cpus(two_cpus, 4).simulation.backend == "local"  # 2 CPUs a job: one actor
    assert share_cpus(two_cpus, 8).simulation.backend == "local"  # 1 CPU, under a client's 2: runs all the same
    assert share_cpus(two_cpus, 2).simulation.backend == "ray"
    assert share_cpus(make_spec("simulation.num_gpus_per_client=0.5"), 8).simulation.backend == "ray"  # a GPU job


def _sweep(tmp_path, *extra):
    given = {e.split("=", 1)[0] for e in extra}
    small = [a for a in SMALL if a.split("=", 1)[0] not in given]
    cmd = [sys.executable, "-m", "octomil_sim", "-m", "simulation.seed=0,1", *small, f"hydra.sweep.dir={tmp_path}",
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {}
    for path in tmp_path.glob("*/results.json"):
        results = json.loads(path.read_text())
        end = path.stat().st_mtime
        runs[results["config"]["simulation"]["seed"]] = (results, end - results["wall_time_s"], end)
    return runs


@pytest.mark.slow
def test_a_sweep_runs_its_jobs_side_by_side_with_the_same_numbers(tmp_path):
    """Each job gets half of the CPUs and keeps the Flower nodes it has alone, so its clients share
    messages (cohorts) as alone and its numbers are the run's alone, bit for bit (10 clients a round:
    cohorts train together, and their float rounding depends on which clients share one)."""
    # (100 rounds: each job runs long enough, a few seconds, that the two overlap however their starts fall)
    cohorts = ["simulation.num_clients=20", "simulation.clients_per_round=10", "simulation.rounds=100"]
    side = _sweep(tmp_path / "side", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *cohorts)
    one_cpu = max(1, os.cpu_count() // 2)
    assert sorted(side) == [0, 1]
    assert all(r["config"]["simulation"]["ray_num_cpus"] == (None if one_cpu == 1 else one_cpu) for r, _, _ in side.values())
    (_, start0, end0), (_, start1, end1) = side[0], side[1]
    assert start0 < end1 and start1 < end0  # the two jobs overlapped in time
    alone = _sweep(tmp_path / "alone", *cohorts)  # one after the other, all CPUs each
    for seed in (0, 1):
        assert side[seed][0]["runtime"]["num_nodes"] == alone[seed][0]["runtime"]["num_nodes"] == min(os.cpu_count(), 20)
        # one CPU a job: its clients run in its own process (the local backend), as one actor would run them
        assert side[seed][0]["config"]["simulation"]["backend"] == ("local" if one_cpu == 1 else "ray")
        assert side[seed][0]["runtime"]["client_processes"] == one_cpu
        assert side[seed][0]["final"] == {**alone[seed][0]["final"], "driver_rss_mb": side[seed][0]["final"]["driver_rss_mb"]}
        assert [r["train_loss"] for r in side[seed][0]["rounds"]] == [r["train_loss"] for r in alone[seed][0]["rounds"]]
