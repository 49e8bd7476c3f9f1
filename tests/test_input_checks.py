"""Bad input found before any expensive work, in one line (issue 11): partitioner arguments, a
Dirichlet split that cannot be made, groups files naming clients that do not exist, and output paths
of the wrong kind."""

import json

import time

import pytest

from octomil_sim.config import check_output_paths, validate
from octomil_sim.data import FederatedData
from octomil_sim.errors import ConfigError


@pytest.mark.parametrize("overrides, expected", [
    (["partition=dirichlet", "partition.alpha=0"],
     "partition.alpha=0: allowed: a number > 0, or a list of such numbers (one per client)"),
    (["partition=dirichlet", "partition.min_partition_size=-1"], "partition.min_partition_size=-1: allowed: an integer >= 0"),
    (["partition=pathological", "partition.num_classes_per_partition=11"],
     "partition.num_classes_per_partition=11: allowed: an integer in 1..10 (dataset=digits has 10 classes)"),
    (["partition=pathological", "partition.class_assignment_mode=first"],
     "partition.class_assignment_mode='first': allowed: random, first-deterministic, deterministic"),
    (["partition=shard", "partition.num_shards_per_partition=0"],
     "partition.num_shards_per_partition=0: allowed: null or an integer >= 1"),
])
def test_partition_arguments(make_spec, overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(make_spec("dataset=digits", "model=mlp", "simulation.num_clients=20", *overrides))
    assert str(err.value) == expected


def test_groups_file_naming_clients_that_do_not_exist(make_spec, tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({**{str(k): "a" for k in range(10)}, "10": "b", "57": "b"}))
    with pytest.raises(ConfigError, match=r"names clients \[10, 57\] that do not exist; allowed: client ids 0\.\.9"):
        validate(make_spec("simulation.num_clients=10", "simulation.clients_per_round=5", f"groups_file={path}"))


def test_impossible_dirichlet_split_is_one_line(make_spec):
    # digits, 20 clients, alpha 0.1, at least 10 examples each: seed 3 cannot be met in flwr-datasets' 10 tries
    cfg = make_spec("dataset=digits", "model=mlp", "partition=dirichlet", "partition.alpha=0.1",
                   "partition.min_partition_size=10", "simulation.num_clients=20", "simulation.seed=3")
    with pytest.raises(ConfigError) as err:
        FederatedData(cfg)
    assert str(err.value) == ("partition.alpha=0.1: flwr-datasets' Dirichlet partitioner could not give all 20 clients "
                              "partition.min_partition_size=10 examples in 10 tries; allowed: a larger partition.alpha, "
                              "a smaller partition.min_partition_size, fewer simulation.num_clients, or another "
                              "simulation.seed")
    FederatedData(make_spec("dataset=digits", "model=mlp", "partition=dirichlet", "partition.alpha=0.1",
                           "partition.min_partition_size=5", "simulation.num_clients=20", "simulation.seed=3"))


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "results.json").mkdir(), "whose results.json is a file"),
    (lambda d: (d / "results.png").mkdir(), "whose results.png is a file"),
    (lambda d: (d / "checkpoint").write_text("x"), "whose checkpoint is a directory"),
])
def test_output_paths_of_the_wrong_kind(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ConfigError, match=f"^hydra.run.dir='{tmp_path}': allowed: a run directory {message}"):
        check_output_paths(tmp_path)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="allowed: a directory"):
        check_output_paths(tmp_path / "f")
    check_output_paths(tmp_path / "new" / "run")  # made, and writable
    assert (tmp_path / "new" / "run").is_dir()


def test_unreachable_hub_fails_fast_in_one_line(make_spec, monkeypatch, tmp_path):
    import time

    import datasets
    from huggingface_hub import constants

    from octomil_sim import data

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        FederatedData(make_spec("dataset=femnist", "model=femnist_cnn", "simulation.num_clients=5",
                               "simulation.clients_per_round=2"))
    assert time.perf_counter() - started < 10  # today's retries took 28 s
    assert str(err.value).startswith("dataset.source.path='flwrlabs/femnist' could not be loaded (the Hugging Face "
                                     "hub is not reachable from here and the dataset is not in the local cache)")


def test_ray_init_args_private_by_default_and_join_on_request(make_spec):
    from octomil_sim.runner import ray_init_args

    local = ray_init_args(make_spec("simulation.ray_num_cpus=2").simulation)
    assert local["address"] == "local" and local["num_cpus"] == 2  # never a cluster someone started here
    joined = ray_init_args(make_spec("simulation.ray_address=auto").simulation)
    assert joined["address"] == "auto" and "num_cpus" not in joined  # the cluster's nodes set their CPUs


@pytest.mark.parametrize("overrides, runs_node, actors", [
    (["simulation.ray_num_cpus=2"], True, 1),  # the default: the driver and one actor
    (["simulation.ray_num_cpus=8", "simulation.num_cpus_per_client=2"], True, 3),
    (["simulation.ray_num_cpus=2", "simulation.driver_node=false"], False, 2),
    (["simulation.ray_num_cpus=1"], False, 1),  # no room for an actor beside it
    (["simulation.ray_num_cpus=3", "simulation.num_cpus_per_client=2"], False, 1),
    (["simulation.ray_address=auto"], False, None),  # a cluster's driver may sit on a login node
    (["simulation.backend=local"], False, 1),
])
def test_when_the_driver_runs_a_node_itself(make_spec, overrides, runs_node, actors):
    from octomil_sim.config import client_slots, driver_runs_node, ray_actors
    from octomil_sim.runner import num_nodes

    s = make_spec("simulation.num_clients=50", *overrides).simulation
    assert driver_runs_node(s) == runs_node
    if actors is not None:
        assert ray_actors(s) == actors and ray_actors(s) + runs_node == client_slots(s)
    assert num_nodes(make_spec("simulation.num_clients=50", *overrides)) == client_slots(s)  # as before: one a process


def test_the_driver_runs_no_node_for_gpu_clients(make_spec, monkeypatch):
    import torch

    from octomil_sim.config import driver_runs_node, ray_actors

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    s = make_spec("simulation.ray_num_cpus=4", "simulation.num_gpus_per_client=0.5").simulation
    assert not driver_runs_node(s) and ray_actors(s) == 2  # the driver is given no GPU share


@pytest.mark.parametrize("overrides, expected", [
    (["simulation.driver_node=maybe"], "simulation.driver_node='maybe': allowed: true, false"),
    (["simulation.ray_address=auto", "simulation.ray_num_cpus=2"],
     "simulation.ray_num_cpus=2: allowed: null when joining a cluster (simulation.ray_address): its nodes set "
     "their own CPUs"),
    (["simulation.ray_num_cpus=1", "simulation.num_cpus_per_client=2"],
     "simulation.num_cpus_per_client=2: allowed: at most simulation.ray_num_cpus (1): no client actor could start "
     "otherwise"),
    (["simulation.ray_address=' '"],
     "simulation.ray_address=' ': allowed: null (a private local Ray instance), auto, or host:port of a running "
     "Ray cluster"),
])
def test_ray_address_values(make_spec, overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(make_spec(*overrides))
    assert str(err.value) == expected


def test_nodes_that_never_register_end_the_run_in_one_line():
    from octomil_sim.errors import RunError
    from octomil_sim.server_app import SimulationGrid

    class OneNode:
        def get_node_ids(self):
            return [7]

    grid = SimulationGrid(OneNode(), num_clients=4)
    with pytest.raises(RunError, match=r"^only 1 of 2 Flower nodes registered within 0 s; "):
        grid.wait_for_nodes(2, timeout=0.2)
    assert grid.wait_for_nodes(2, timeout=5, should_stop=lambda: True) is False  # a signal ends the wait
    assert grid.wait_for_nodes(1, timeout=0.2) is True and grid.nodes == [7]


def test_a_first_round_with_no_client_actor_started_ends_the_run_in_one_line(monkeypatch):
    """Flower registers its nodes before Ray starts their actors, and waits on an actor that never starts
    without limit: the first exchange asks how many actors run once ``startup_timeout`` has passed."""
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp's run sets
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    from octomil_sim.errors import RunError
    from octomil_sim.server_app import SimulationGrid

    class Silent:  # accepts every message and never replies
        def get_node_ids(self):
            return [1]

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            return []

    def first_round(grid):
        grid.nodes = [1]
        return grid.send_and_receive([Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)],
                                     timeout=0.5)

    started = time.monotonic()
    with pytest.raises(RunError, match=r"^Ray started none of the client actors within 0 s of the first round"):
        first_round(SimulationGrid(Silent(), num_clients=1, actors_started=lambda: 0, startup_timeout=0.1))
    assert time.monotonic() - started < 0.4
    # actors running (a slow first round) or Ray unable to say: the exchange waits for its own timeout
    for count in (1, None):
        failures = first_round(SimulationGrid(Silent(), num_clients=1, actors_started=lambda: count,
                                              startup_timeout=0.1))
        assert [m.error.reason for m in failures] == ["no reply from its node"]


def test_stop_request_first_signal_asks_second_interrupts(tmp_path):
    import signal
    import subprocess
    import sys

    from octomil_sim.interrupt import Interrupted, stop_on_signals

    saved = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stop:
        assert signal.getsignal(signal.SIGINT) == stop.handle
        stop.handle(signal.SIGTERM, None)
        assert stop.is_set() and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) == saved
    # the second signal ends the process at once (its own process here)
    code = ("import os, signal; from octomil_sim.interrupt import stop_on_signals\n"
            "with stop_on_signals() as stop:\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    import time; time.sleep(0.2); assert stop.is_set(); os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "stopped by a second SIGINT; the newest checkpoint is kept"
    err = Interrupted(signal.SIGINT, 12, tmp_path, checkpointed=True)
    assert err.exit_code == 130 and str(err) == (f"stopped by SIGINT after round 12; round 12 is checkpointed in "
                                                 f"{tmp_path}; the same command with hydra.run.dir={tmp_path} resumes it")
    assert str(Interrupted(signal.SIGTERM, 0, tmp_path, False)).endswith("before its first round: nothing to resume")
