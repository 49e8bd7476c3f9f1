"""The clients file (``octomil_sim.client_data``): a local Ray node's actors read every client's
tensors from one file the driver writes, and must get exactly what the partitions give."""

import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch

from octomil_sim.client_data import ClientsFile, open_clients_file
from octomil_sim.data import FederatedData, cache_source, clients_file, write_clients_file
from octomil_sim.errors import ConfigError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTOMIL_SIM_CACHE", str(tmp_path / "cache"))


def _written(spec, fresh=True):
    cache_source(spec)
    path = clients_file(spec)
    assert path is not None and not (fresh and path.exists())
    assert write_clients_file(spec, path) == spec.simulation.num_clients
    return path


@pytest.mark.parametrize("overrides", [
    ("simulation.num_clients=30",),  # Synthetic(0.5, 0.5), natural ids
    ("dataset=digits", "model=mlp", "partition=dirichlet", "simulation.num_clients=12", "simulation.seed=3"),
    ("dataset=digits", "model=mlp", "partition=iid", "simulation.num_clients=7"),
    ("dataset=digits", "model=mlp", "partition=pathological", "simulation.num_clients=10"),
    ("dataset=digits", "model=mlp", "partition=shard", "simulation.num_clients=10", "+dataset.split_seed=5"),
    ("dataset=synthetic_tokens", "model=prompt_transformer", "strategy=fedavg", "simulation.num_clients=6"),
])
def test_the_clients_file_holds_each_partitions_tensors_bit_for_bit(make_spec, overrides):
    spec = make_spec(*overrides)
    path = _written(spec)
    partitions, from_file = FederatedData(spec), ClientsFile(spec, path)
    assert from_file.num_clients == partitions.num_clients == spec.simulation.num_clients
    for k in range(spec.simulation.num_clients):
        a, b = partitions.client(k), from_file.client(k)
        assert from_file.num_train(k) == partitions.num_train(k) == b.num_train
        for u, v in zip(a.tensors(), b.tensors()):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)


def test_a_written_file_is_found_again_and_a_broken_one_written_anew(make_spec):
    spec = make_spec("simulation.num_clients=8")
    path = _written(spec)
    stamp = path.stat().st_mtime_ns
    assert write_clients_file(spec, path) == 8 and path.stat().st_mtime_ns == stamp  # found, not written
    path.write_bytes(b"not a torch file")
    assert write_clients_file(spec, path) == 8
    assert torch.equal(ClientsFile(spec, path).client(3).x_train, FederatedData(spec).client(3).x_train)


def test_the_files_name_follows_what_its_tensors_depend_on(make_spec):
    def name(*overrides):
        spec = make_spec(*overrides)
        cache_source(spec)
        return clients_file(spec).name

    base = name("dataset=digits", "partition=dirichlet", "simulation.num_clients=10")
    assert name("dataset=digits", "partition=dirichlet", "simulation.num_clients=10") == base
    assert name("dataset=digits", "partition=dirichlet", "simulation.num_clients=11") != base
    assert name("dataset=digits", "partition=dirichlet", "simulation.num_clients=10", "simulation.seed=1") != base
    assert name("dataset=digits", "partition=iid", "simulation.num_clients=10") != base
    # the split into train and test rows happens in the reader: its seed makes no new file
    iid = name("dataset=digits", "partition=iid", "simulation.num_clients=10")
    assert name("dataset=digits", "partition=iid", "simulation.num_clients=10", "+dataset.split_seed=4") == iid
    assert name("dataset=digits", "partition=iid", "simulation.num_clients=10", "simulation.test_fraction=0.5") == iid


def test_no_clients_file_for_a_hub_dataset_or_a_cluster(make_spec, tmp_path):
    from femnist_fixture import write_femnist

    hub = make_spec("dataset=femnist", "model=femnist_cnn", "simulation.num_clients=3",
                    f"dataset.source.path={write_femnist(tmp_path / 'femnist')}")
    assert clients_file(hub) is None
    spec = make_spec("simulation.num_clients=10")
    assert clients_file(spec) is None  # its dataset is not cached yet
    cache_source(spec)
    assert clients_file(spec) is not None
    assert clients_file(make_spec("simulation.num_clients=10", "simulation.ray_address=10.0.0.1:6379")) is None


def test_too_many_clients_is_the_partitions_error(make_spec):
    spec = make_spec("dataset=digits", "model=mlp", "partition=natural_id", "dataset.client_id_key=y",
                     "simulation.num_clients=11")
    cache_source(spec)
    with pytest.raises(ConfigError) as from_partitions:
        FederatedData(spec)
    with pytest.raises(ConfigError) as from_writer:
        write_clients_file(spec, clients_file(spec))
    assert str(from_writer.value) == str(from_partitions.value)
    assert not clients_file(spec).exists()


def test_an_actor_waits_for_the_file_and_reads_the_partitions_when_none_comes(make_spec, monkeypatch):
    from octomil_sim.client_app import client_tensors

    spec = make_spec("simulation.num_clients=5")
    cache_source(spec)
    path = clients_file(spec)
    threading.Timer(0.3, write_clients_file, (spec, path)).start()  # the driver, still checking the data
    started = time.monotonic()
    assert isinstance(open_clients_file(spec, str(path), timeout_s=30), ClientsFile)
    assert time.monotonic() - started >= 0.25
    monkeypatch.setattr("octomil_sim.client_data.CLIENTS_FILE_WAIT_S", 0.1)
    missing = str(path.with_name("never-written.pt"))
    assert open_clients_file(spec, missing) is None
    assert isinstance(client_tensors(spec, missing), FederatedData)
    assert isinstance(client_tensors(spec, str(path)), ClientsFile)


def test_a_ray_actors_client_side_imports_no_hf_datasets(make_spec, tmp_path):
    """What a Ray client actor imports and builds (``ClientAppActor.prepare``: the ClientApp, its
    client runtime over the clients file, the algorithms' client halves): neither HF ``datasets`` nor
    flwr-datasets, pyarrow or pandas (0.8 s and 100 MB an actor)."""
    common = ("simulation.num_clients=6", f"simulation.state_dir={tmp_path / 'state'}")
    specs = [make_spec("strategy=ditto", *common), make_spec("strategy=fedavg", "fairness=bounded_group_loss", *common),
             make_spec("strategy=qffl", "model=mlp", *common)]
    files = [str(_written(spec, fresh=False)) for spec in specs]  # (the same data: one file)
    (tmp_path / "specs.pkl").write_bytes(pickle.dumps(list(zip(specs, files))))
    code = (
        "import pickle, sys\n"
        "import octomil_sim.ray_actor\n"
        "from octomil_sim.client_app import build_client_app, client_runtime\n"
        f"for spec, path in pickle.loads(open({str(tmp_path / 'specs.pkl')!r}, 'rb').read()):\n"
        "    build_client_app(spec, path).prepare()\n"
        "    assert client_runtime(spec, path).data.client(2).num_train > 0\n"
        "loaded = [m for m in ('datasets', 'flwr_datasets', 'pyarrow', 'pandas') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_the_servers_client_sizes_come_from_the_clients_file(make_spec, monkeypatch):
    from octomil_sim import runner

    spec = make_spec("strategy=qffl", "simulation.num_clients=9")  # q-FFL samples clients by size
    from_partitions = runner.client_sizes(spec)["client_sizes"]
    _written(spec)
    monkeypatch.setattr(runner, "FederatedData", None)  # the partitions are not opened again
    assert runner.client_sizes(spec)["client_sizes"] == from_partitions
    assert from_partitions == [FederatedData(spec).client(k).num_train for k in range(9)]


def test_a_driver_that_serves_clients_opens_a_hub_datasets_partitions_once(make_spec, monkeypatch):
    """Without a clients file (a hub dataset), the data check and size-proportional client sizes open
    the partitions into the process's data cache when this process's ClientApp serves clients (the
    local backend, or the driver's own node on Ray), which then finds them there; otherwise each
    opens them for itself and drops them."""
    from octomil_sim import data, runner

    built = []
    original = data.FederatedData

    def counted(spec):
        built.append(spec)
        return original(spec)

    monkeypatch.setattr(data, "FederatedData", counted)
    monkeypatch.setattr(runner, "FederatedData", counted)
    monkeypatch.setattr(runner, "clients_file", lambda spec: None)  # as for a hub dataset: no clients file
    for overrides, opened in ((["simulation.ray_num_cpus=2"], 1), (["simulation.backend=local"], 1),
                              (["simulation.ray_num_cpus=2", "simulation.driver_node=false"], 2)):
        data.forget_data()
        built.clear()
        spec = make_spec("strategy=qffl", "simulation.num_clients=9", *overrides)  # q-FFL samples clients by size
        assert runner._count_clients(spec) == 9 and len(runner.client_sizes(spec)["client_sizes"]) == 9
        assert len(built) == opened, overrides
        if opened == 1:
            assert data.federated_data(spec) is not None and len(built) == 1  # the ClientApp's: already here
    data.forget_data()


def test_a_driver_that_finds_the_clients_file_imports_no_hf_datasets(make_spec, tmp_path):
    """What the driver does before its rounds when an earlier run wrote the clients file (``runner._run``:
    the cached source, the file's path, the data check, size-proportional client sizes, the strategy and
    the ClientApp) opens no partition: neither HF ``datasets`` nor flwr-datasets, pyarrow or pandas is
    imported (0.8 s of the driver's start and about 100 MB). Without the file the same steps import them."""
    spec = make_spec("strategy=qffl", "simulation.num_clients=9", f"simulation.state_dir={tmp_path / 'state'}")
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    code = (
        "import pickle, sys\n"
        "from octomil_sim import runner\n"
        "from octomil_sim.client_app import build_client_app\n"
        "from octomil_sim.data import cache_source, clients_file, write_clients_file\n"
        f"spec = pickle.loads(open({str(tmp_path / 'spec.pkl')!r}, 'rb').read())\n"
        "cache_source(spec)\n"
        "path = clients_file(spec)\n"
        "assert runner._count_clients(spec, path) == 9\n"
        "assert len(runner.client_sizes(spec)['client_sizes']) == 9\n"
        "runner.build_strategy(spec)\n"
        "build_client_app(spec, str(path))\n"
        "loaded = [m for m in ('datasets', 'flwr_datasets', 'pyarrow', 'pandas') if m in sys.modules]\n"
        "print(loaded)\n"
    )

    def loaded() -> str:
        return subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ}, capture_output=True,
                              text=True).stdout.strip()

    assert loaded() == "['datasets', 'flwr_datasets', 'pyarrow', 'pandas']"  # the first run writes the file
    assert loaded() == "[]"
