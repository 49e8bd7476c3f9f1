"""Partitions are disjoint and complete; FEMNIST loads through the real code path."""

import numpy as np
import pytest
import torch

from femnist_fixture import write_femnist
from octomil_sim.data import FederatedData, synthetic_dataset
from octomil_sim.errors import ConfigError


def _rows(t: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in t.reshape(len(t), -1)]


def _all_rows(fd: FederatedData) -> list[bytes]:
    rows = []
    for pid in range(fd.num_clients):
        c = fd.client(pid)
        rows += _rows(c.x_train) + _rows(c.x_test)
    return rows


@pytest.mark.parametrize("partition", ["natural_id", "iid", "dirichlet", "pathological", "shard"])
def test_partitions_disjoint_and_complete(make_spec, partition):
    cfg = make_spec(f"partition={partition}", "simulation.num_clients=10")
    fd = FederatedData(cfg)
    source = cfg.dataset.source.build().with_format("numpy")
    everything = _rows(torch.from_numpy(np.asarray(source["x"])))
    assert len(set(everything)) == len(everything)  # Gaussian features: every row is unique
    rows = _all_rows(fd)
    assert len(rows) == len(set(rows)), "a sample is in two clients (or twice in one)"
    assert set(rows) <= set(everything)
    if partition == "shard":  # FedAvg-paper shards drop only the remainder that fills no shard
        assert len(everything) - len(rows) == len(everything) % (10 * cfg.partition.partitioner.get('num_shards_per_partition'))
    else:
        assert len(rows) == len(everything)


def test_natural_id_clients_are_the_generated_users(make_spec):
    cfg = make_spec("simulation.num_clients=5")
    fd = FederatedData(cfg)
    ds = synthetic_dataset(0.5, 0.5, 5, seed=cfg.simulation.seed).with_format("numpy")
    for pid in range(5):
        c = fd.client(pid)
        own = set(_rows(torch.from_numpy(np.asarray(ds["x"])[np.asarray(ds["client_id"]) == pid])))
        assert set(_rows(c.x_train)) | set(_rows(c.x_test)) == own
        assert c.num_test == pytest.approx(0.2 * len(own), abs=1)


def test_synthetic_is_reproducible_and_alpha_beta_checked():
    a = synthetic_dataset(1.0, 1.0, 4, seed=3)
    b = synthetic_dataset(1.0, 1.0, 4, seed=3)
    assert a["y"] == b["y"]
    with pytest.raises(ConfigError, match="alpha=-1"):
        synthetic_dataset(-1, 0.5, 4)


def test_femnist_local_copy_through_flwr_datasets(make_spec, tmp_path):
    root = write_femnist(tmp_path / "femnist", writers=6, per_writer=12)
    cfg = make_spec("dataset=femnist", "model=femnist_cnn", f"dataset.source.path={root}",
                   "simulation.num_clients=6")
    fd = FederatedData(cfg)
    seen = set()
    for pid in range(6):
        c = fd.client(pid)
        assert c.x_train.shape[1:] == (1, 28, 28) and c.x_train.dtype == torch.float32
        assert c.num_train + c.num_test == 12
        values = torch.unique(torch.cat([c.x_train, c.x_test]))
        assert len(values) == 1, "a client holds images of two writers"
        seen.add(round(values.item() * 255))
        assert int(c.y_train.max()) < 62
    assert seen == {10 * (w + 1) for w in range(6)}  # one client per writer, all writers used
    model = cfg.model.net.build(input_shape=(1, 28, 28), num_classes=62)
    assert model(fd.client(0).x_train).shape == (len(fd.client(0).y_train), 62)


def test_femnist_too_many_clients_names_the_limit(make_spec, tmp_path):
    root = write_femnist(tmp_path / "femnist", writers=3, per_writer=4)
    cfg = make_spec("dataset=femnist", f"dataset.source.path={root}", "simulation.num_clients=5")
    with pytest.raises(ConfigError, match=r"simulation.num_clients=5: .* only 3 clients; allowed: 1..3"):
        FederatedData(cfg)


def test_missing_dataset_offline_is_one_line(make_spec, tmp_path):
    cfg = make_spec("dataset=femnist", f"dataset.source.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError) as err:
        FederatedData(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "dataset.source.path=" in msg and "nowhere" in msg


def test_natural_id_on_a_dataset_without_clients(make_spec):
    with pytest.raises(ConfigError, match="partition=natural_id: dataset=digits .* allowed partitions"):
        FederatedData(make_spec("dataset=digits"))


def test_train_test_indices_are_hf_train_test_split():
    """Clients split their rows exactly as HF's ``train_test_split`` does (the numbers before this
    fast path and after it are the same)."""
    import datasets

    from octomil_sim.client_data import train_test_indices

    for n, fraction, seed in ((10, 0.2, 0), (57, 0.2, 3), (5, 0.5, 11)):
        ds = datasets.Dataset.from_dict({"i": list(range(n))})
        split = ds.train_test_split(test_size=fraction, seed=seed)
        train, test = train_test_indices(n, fraction, seed)
        assert train.tolist() == split["train"]["i"] and test.tolist() == split["test"]["i"]
