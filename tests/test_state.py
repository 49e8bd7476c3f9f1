"""The client-state store: both backends keep each client's tensors apart and intact."""

import pytest
import torch

from octomil_sim.errors import ConfigError
from octomil_sim.state import DiskStateStore, MemoryStateStore


@pytest.fixture(params=["memory", "disk"])
def store(request, tmp_path):
    return MemoryStateStore() if request.param == "memory" else DiskStateStore(tmp_path / "state")


def test_round_trip_per_client_and_key(store):
    assert store.load(3, "v") is None
    store.save(3, "v", {"w": torch.tensor([1.0, 2.0])})
    store.save(4, "v", {"w": torch.tensor([5.0])})
    store.save(3, "h", {"w": torch.tensor([-1.0])})
    torch.testing.assert_close(store.load(3, "v")["w"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(store.load(4, "v")["w"], torch.tensor([5.0]))
    torch.testing.assert_close(store.bind(3).load("h")["w"], torch.tensor([-1.0]))
    store.bind(3).save("v", {"w": torch.tensor([7.0])})  # overwrite
    torch.testing.assert_close(store.load(3, "v")["w"], torch.tensor([7.0]))


def test_loaded_state_is_a_copy(store):
    t = torch.tensor([1.0])
    store.save(0, "v", {"w": t})
    t += 1  # the caller keeps training its tensor
    loaded = store.load(0, "v")
    loaded["w"] += 10
    torch.testing.assert_close(store.load(0, "v")["w"], torch.tensor([1.0]))


def test_disk_store_persists_and_leaves_no_partial_files(tmp_path):
    DiskStateStore(tmp_path).save(9, "ditto_v", {"w": torch.arange(3.0)})
    torch.testing.assert_close(DiskStateStore(tmp_path).load(9, "ditto_v")["w"], torch.arange(3.0))
    assert sorted(p.name for p in (tmp_path / "ditto_v").iterdir()) == ["9.pt"]


def test_memory_store_needs_a_single_actor(make_spec):
    from octomil_sim.config import validate

    with pytest.raises(ConfigError, match=r"simulation.state_store='memory': allowed: disk with 2 client processes \(1 Ray actor and the driver"):
        validate(make_spec("simulation.state_store=memory", "simulation.ray_num_cpus=2"))
    validate(make_spec("simulation.state_store=memory", "simulation.ray_num_cpus=1", "simulation.checkpoint_every=0"))
