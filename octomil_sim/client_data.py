"""Clients' tensors, and the file through which a Ray actor gets them without Hugging Face ``datasets``.

A client's data is its partition of the dataset as tensors (``data.FederatedData`` builds them from HF
``datasets`` and a flwr-datasets partitioner), split once into its training and held-out test rows
(``client_split``). This module needs only torch and NumPy.

Importing ``datasets`` and flwr-datasets (with pandas and pyarrow) costs a process 0.8 s of a core and
about 100 MB of memory (measured on 2 cores, after torch and Flower), and opening and partitioning the
data another 0.75 s at 1,000 clients. Every Ray client actor paid both at start, while the driver paid
them too, and then built each client's tensors the first time one of its clients trained (about 1.7 ms
a client). On a local Ray node the driver now writes every client's tensors once, in client order, to
one file (``write_clients_file``, during its data check); the actors map it (``ClientsFile``) and never
import ``datasets``. The file's pages are the page cache's, shared by all actors. Datasets from the hub
and runs joining a Ray cluster (whose actors may not see the driver's disk) keep the partitions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from octomil_sim.errors import ConfigError

__all__ = ["CLIENTS_FILE_WAIT_S", "ClientData", "ClientsFile", "cache_root", "client_split", "num_test_rows", "num_train_rows", "open_clients_file",
           "train_test_indices"]

#: how long an actor waits for the driver's clients file before it reads the partitions itself
CLIENTS_FILE_WAIT_S = 600.0
#: the clients file's layout; a change of layout or of how its tensors are built gets a new number
FORMAT = 1


@dataclass
class ClientData:
    """One client's tensors: its training split and its held-out test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.x_train, self.y_train, self.x_test, self.y_test

    def to(self, device: torch.device) -> ClientData:
        """A copy on ``device`` (e.g. a GPU client runtime's)."""
        return ClientData(*(t.to(device) for t in self.tensors()))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


def cache_root() -> Path:
    """Where generated datasets are kept (``OCTOMIL_SIM_CACHE``, default ``~/.cache/octomil_sim``)."""
    return Path(os.environ.get("OCTOMIL_SIM_CACHE", Path.home() / ".cache" / "octomil_sim")) / "datasets"


def num_test_rows(n: int, test_fraction: float) -> int:
    """How many of a client's ``n`` rows are held out: ``ceil(test_fraction n)``, leaving at least one
    for training."""
    n_test = math.ceil(test_fraction * n)
    if n - n_test < 1:
        raise ConfigError(f"simulation.test_fraction={test_fraction}: a client with {n} examples keeps none for "
                          "training; allowed: a smaller fraction, or a partition with larger clients")
    return n_test


def train_test_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of an ``n``-row partition in its train and test split: exactly those of HF's
    ``Dataset.train_test_split(test_size=test_fraction, seed=seed)`` (ceil(test_fraction n) test rows
    first in ``default_rng(seed).permutation(n)``), without building two more datasets."""
    n_test = num_test_rows(n, test_fraction)
    permutation = np.random.default_rng(seed).permutation(n)
    return permutation[n_test:], permutation[:n_test]


def num_train_rows(n: int, test_fraction: float) -> int:
    """How many of a client's ``n`` rows it trains on (the rest are held out: ``num_test_rows``)."""
    return n - num_test_rows(n, test_fraction)


def client_split(x: torch.Tensor, y: torch.Tensor, partition_id: int, spec) -> ClientData:
    """Partition ``partition_id``'s rows ``x``, ``y`` split into the client's train and test tensors
    (``train_test_indices``, seeded by ``dataset.split_seed``, else ``simulation.seed``, plus the id)."""
    d, s = spec.dataset, spec.simulation
    split_seed = s.seed if d.split_seed is None else d.split_seed
    train, test = (torch.from_numpy(i) for i in train_test_indices(len(y), s.test_fraction, split_seed + partition_id))
    return ClientData(x[train], y[train], x[test], y[test])


# --------------------------------------------------------------------------------------------------
# The clients file
# --------------------------------------------------------------------------------------------------
def clients_file_name(spec, source_name: str, versions: str) -> str:
    """The clients file's name for ``spec``'s data from the generated dataset cached as ``source_name``
    (whose name holds the hash of its generator's arguments and code) with the libraries at
    ``versions``: a hash of everything its tensors depend on, so a run finds the file a run with the same data wrote (a sweep's jobs)."""
    dataset = {**asdict(spec.dataset), "split_seed": None}  # the train/test split happens in the reader
    key = json.dumps([FORMAT, source_name, versions, dataset, asdict(spec.partition), spec.simulation.num_clients],
                     sort_keys=True, default=str)  # (a partition's seed is in its kwargs)
    return f"{source_name}-clients-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def save_clients_file(path: Path, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> None:
    """Write all clients' rows ``x``, ``y`` (client order; client k has ``sizes[k]`` rows, at
    ``offsets[k]:offsets[k + 1]``) to ``path``, atomically: a reader sees the whole file or none."""
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"x": x.contiguous(), "y": y.contiguous(), "offsets": offsets}, tmp)
    os.replace(tmp, path)


class ClientsFile:
    """``data.FederatedData``'s reading side (``num_clients``, ``num_train``, ``client``) over the
    clients file at ``path``, memory-mapped: a client's tensors are copied out on its first use (as
    ``FederatedData`` builds them) and then kept."""

    def __init__(self, spec, path: Path):
        blob = torch.load(path, mmap=True, weights_only=True)
        self.spec, self._x, self._y, self._offsets = spec, blob["x"], blob["y"], blob["offsets"].tolist()
        self.num_clients = len(self._offsets) - 1
        if self.num_clients != spec.simulation.num_clients:
            raise RuntimeError(f"{path} holds {self.num_clients} clients, not simulation.num_clients="
                               f"{spec.simulation.num_clients}")
        self._clients: dict[int, ClientData] = {}

    def num_train(self, partition_id: int) -> int:
        return num_train_rows(self._offsets[partition_id + 1] - self._offsets[partition_id],
                              self.spec.simulation.test_fraction)

    def client(self, partition_id: int) -> ClientData:
        if partition_id not in self._clients:
            rows = slice(self._offsets[partition_id], self._offsets[partition_id + 1])
            self._clients[partition_id] = client_split(self._x[rows], self._y[rows], partition_id, self.spec)
        return self._clients[partition_id]


def open_clients_file(spec, path: str, timeout_s: float | None = None) -> ClientsFile | None:
    """The clients file at ``path`` once the driver has written it (an early actor starts before the
    driver's data check ends), or None if it does not come within ``timeout_s`` (default
    ``CLIENTS_FILE_WAIT_S``; the caller then reads the partitions itself)."""
    deadline = time.monotonic() + (CLIENTS_FILE_WAIT_S if timeout_s is None else timeout_s)
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return ClientsFile(spec, Path(path))
