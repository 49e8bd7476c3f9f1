"""The official pFedMe Synthetic data and the carried-over minibatch stream."""

import numpy as np
import torch

from octomil_sim.data import FederatedData, pfedme_synthetic_dataset
from octomil_sim.state import MemoryStateStore
from octomil_sim.training import BatchStream


def test_pfedme_synthetic_matches_the_official_generator_stream():
    ds = pfedme_synthetic_dataset(0.5, 0.5, num_clients=3, seed=0)
    rng = np.random.RandomState(0)  # the official script's np.random.seed(0), same draws in the same order
    sizes = (rng.lognormal(4, 2, 3).astype(int) + 50) * 5
    counts = np.bincount(np.asarray(ds["client_id"]))
    assert counts.tolist() == sizes.tolist()
    assert all(c % 5 == 0 and c >= 250 for c in counts)  # x5, no cap of 1,000
    assert counts.sum() > 1000


def test_pfedme_synthetic_full_size_and_fixed_across_run_seeds(make_spec):
    assert sum((np.random.RandomState(0).lognormal(4, 2, 100).astype(int) + 50) * 5) == 205_795
    a = FederatedData(make_spec("dataset=synthetic_pfedme", "simulation.seed=0", "simulation.test_fraction=0.1"))
    b = FederatedData(make_spec("dataset=synthetic_pfedme", "simulation.seed=5", "simulation.test_fraction=0.1"))
    for k in (0, 7):
        ca, cb = a.client(k), b.client(k)
        assert torch.equal(ca.x_train, cb.x_train) and torch.equal(ca.y_test, cb.y_test)
        n = ca.num_train + ca.num_test
        assert ca.num_test == n - int(0.9 * n)  # the official 90/10 split


def test_batch_stream_carries_over_between_rounds():
    store = MemoryStateStore().bind(0)
    first = BatchStream(5, 2, store)
    assert [i.tolist() for i in first.take(2)] == [[0, 1], [2, 3]]
    first.save()
    second = BatchStream(5, 2, store)  # next round: continues where the last one stopped
    assert [i.tolist() for i in second.take(3)] == [[4], [0, 1], [2, 3]]


def test_num_train_matches_the_built_split(make_spec):
    data = FederatedData(make_spec("simulation.num_clients=5", "simulation.test_fraction=0.1"))
    assert [data.num_train(k) for k in range(5)] == [data.client(k).num_train for k in range(5)]
