"""``octomil_sim.simulate``: a run from Python, with your own ``nn.Module`` and data.

    import octomil_sim
    result = octomil_sim.simulate(model=net, data=frame, personalization="ditto", fairness="tilted", rounds=20)
    result.global_acc, result.personalized_acc, result.clients, result.rounds

It builds the same run description as the command line: the keyword arguments become Hydra overrides of
``conf/config.yaml`` (``rounds=20`` is ``simulation.rounds=20``; ``overrides=[...]`` passes any other), the
config is composed and checked exactly as ``python -m octomil_sim`` does, and ``octomil_sim.runner.run``
runs it. Live objects reach the Ray actors through the run folder, without an importable module of yours:

- a ``pandas.DataFrame`` (one row per example: a client column, a label column, feature columns) is
  written to ``<out>/data.parquet`` and read with ``octomil_sim.data.table_file``; an HF ``datasets.Dataset``
  is written with ``save_to_disk`` and read with ``octomil_sim.data.arrow_dir``;
- a model (an ``nn.Module``, or a factory ``f(input_shape, num_classes)``) is written with cloudpickle to
  ``<out>/model.pkl`` (by value when its class lives in your script or notebook) and loaded by
  ``saved_model`` in every process. Its weights are the round-0 global model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octomil_sim.errors import ConfigError

#: ``simulate`` keywords that are one config key each
SETTINGS = {"rounds": "simulation.rounds", "clients": "simulation.num_clients",
            "clients_per_round": "simulation.clients_per_round", "seed": "simulation.seed", "lr": "simulation.lr",
            "local_epochs": "simulation.local_epochs", "batch_size": "simulation.batch_size",
            "fraction_evaluate": "simulation.fraction_evaluate", "checkpoint_every": "simulation.checkpoint_every",
            "gpus_per_client": "simulation.num_gpus_per_client", "experiment": "experiment", "dataset": "dataset", "partition": "partition"}


@dataclass
class PersonalizedModel:
    """A model with its personal layers named: ``local_layers`` never leave the client, ``sync_layers``
    are the only ones shared (give one of the two; names of module attributes / parameter prefixes,
    e.g. ``["head"]``). ``simulate(model=PersonalizedModel(net, local_layers=["head"]))`` trains it with
    ``personalization="personal_layers"`` unless another one that takes layer names is given."""

    module: Any
    local_layers: Sequence[str] | None = None
    sync_layers: Sequence[str] | None = None


def saved_model(path: str, input_shape: Sequence[int], num_classes: int, sha256: str | None = None):
    """The model ``simulate`` saved at ``path``: a copy of the module, or what the factory builds.
    ``sha256`` (of the file) only marks which model a run used: a run folder reused with another model
    is then a different experiment, not a resumption."""
    import cloudpickle
    from torch import nn

    with open(path, "rb") as f:
        obj = cloudpickle.load(f)
    if isinstance(obj, nn.Module):
        return obj
    return obj(input_shape=tuple(input_shape), num_classes=num_classes)


@dataclass
class Results:
    """What a run wrote to ``results.json`` (``raw``), with the numbers people read first."""

    raw: dict
    path: Path
    _frames: dict = field(default_factory=dict, repr=False)

    @property
    def global_acc(self) -> float:
        """Pooled test accuracy of the final global model over all clients."""
        return self.raw["final"]["global_acc"]

    @property
    def personalized_acc(self) -> float:
        """Pooled test accuracy of every client's personalized model."""
        return self.raw["final"]["personalized_acc"]

    @property
    def worst_group_improvement(self) -> float | None:
        """min over groups of the mean (personalized - global accuracy); without groups, over the worst
        tenth of clients by global accuracy."""
        return self.raw.get("worst_group_improvement", {}).get("value")

    @property
    def clients(self):
        """One row per client (pandas DataFrame): ``partition_id``, test size, accuracies, losses, ..."""
        import pandas as pd

        return pd.DataFrame(self.raw["clients"])

    @property
    def rounds(self):
        """One row per round (pandas DataFrame): training and evaluation metrics, bytes, time."""
        import pandas as pd

        return pd.DataFrame(self.raw["rounds"])

    @property
    def groups(self):
        """One row per group (pandas DataFrame), when groups were given; else None."""
        import pandas as pd

        return None if "groups" not in self.raw else pd.DataFrame(self.raw["groups"]).T

    def plot(self, path: str | Path | None = None) -> Path:
        """The accuracy curves and per-client histogram (``results.png`` of the run by default)."""
        from octomil_sim.plots import plot_run

        return plot_run(self.raw, Path(path) if path else self.path / "results.png")

    def save(self, folder: str | Path) -> Path:
        """Write ``results.json`` and ``results.png`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(self.raw, indent=1))
        self.plot(folder / "results.png")
        return folder


def _dataset(data, out: Path, label: str, client: str | None, features: Sequence[str] | None) -> tuple[dict, list]:
    """Write ``data`` into ``out``; return the ``dataset`` config node that reads it and the client ids in
    partition order (flwr-datasets' ``NaturalIdPartitioner`` numbers the sorted ids). The node records
    the data's SHA-256, so a run folder reused with other data is a different experiment."""
    import numpy as np

    kind = type(data).__module__.split(".")[0]
    if kind == "pandas":
        columns = list(map(str, data.columns))
    elif kind == "datasets":
        columns = list(data.column_names)
    else:
        raise ConfigError(f"data: a {type(data).__name__}; allowed: a pandas DataFrame or a datasets.Dataset "
                          "(one row per example), or None for the config's dataset")
    wanted = [label, *([client] if client is not None else []), *(features or [])]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ConfigError(f"data: no column {missing[0]!r}; its columns: {', '.join(columns)} "
                          "(name them with label=, client=, features=)")
    if kind == "pandas":
        cols = list(features or [c for c in data.columns if c not in (label, client)])
        path = out / "data.parquet"
        data.to_parquet(path)
        source = {"_target_": "octomil_sim.data.table_file", "path": str(path.resolve()), "label": label,
                  "client": client, "features": cols}
        node = {"feature_key": "x", "label_key": "y", "client_id_key": "client" if client else None,
                "input_shape": [len(cols)], "num_classes": int(data[label].max()) + 1, "source": source}
        ids = sorted(data[client].unique()) if client else []
    else:
        feature_key = (features or ["x"])[0]
        path = out / "data_arrow"
        data.save_to_disk(str(path))
        node = {"feature_key": feature_key, "label_key": label, "client_id_key": client,
                "input_shape": list(np.asarray(data[0][feature_key]).shape) or [1],
                "num_classes": int(max(data[label])) + 1,
                "source": {"_target_": "octomil_sim.data.arrow_dir", "path": str(path.resolve())}}
        ids = sorted(set(data[client])) if client else []
    node["source"]["sha256"] = _sha256(path)
    return {"name": "user_data", "scale": 1.0, **node}, ids


def _sha256(path: Path) -> str:
    """Of a file, or of every file under a folder (in name order)."""
    import hashlib

    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def simulate(model: Any = None, data: Any = None, *, personalization: str | None = None, fairness: str = "none",
             privacy: str = "none", groups: Mapping[Any, str] | str | Path | None = None, out: str | Path | None = None,
             label: str = "label", client: str | None = "client", features: Sequence[str] | None = None,
             overrides: Sequence[str] = (), progress: bool = False, **settings: Any) -> Results:
    """Run one simulation and return its ``Results``.

    ``model``: an ``nn.Module`` (its weights start the run), a factory ``f(input_shape, num_classes)``, a
    ``PersonalizedModel``, or None (``model=`` of the config). ``data``: a DataFrame or ``datasets.Dataset``
    with ``label``, ``client`` (one client per value; None: split it with ``partition=``) and ``features``
    columns (None: all others), or None (``dataset=`` of the config). ``personalization`` / ``fairness`` /
    ``privacy``: as on the command line (``-`` may stand for ``_``). ``groups``: {client: group} or a JSON file.
    ``settings``: ``rounds``, ``clients``, ``clients_per_round``, ``seed``, ``lr``, ``local_epochs``,
    ``batch_size``, ``fraction_evaluate``, ``checkpoint_every``, ``gpus_per_client`` (> 0: clients train on
    a GPU), ``experiment``, ``dataset``, ``partition``, ``local_layers``, ``sync_layers``. ``overrides``: Hydra overrides (``"strategy.client.lam=0.5"``).
    ``out``: the run folder (default ``outputs/api/<date>_<time>``); a finished or checkpointed run there
    is resumed as on the command line."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from octomil_sim.config import check_group_choices
    from octomil_sim.runner import run
    from octomil_sim.spec import RunSpec

    layers = {k: settings.pop(k) for k in ("local_layers", "sync_layers") if k in settings}
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        allowed = ", ".join(sorted([*SETTINGS, "local_layers", "sync_layers", "model", "data", "personalization",
                                    "fairness", "privacy", "groups", "out", "label", "client", "features", "overrides"]))
        raise ConfigError(f"{unknown[0]}={settings[unknown[0]]!r}: not a simulate() argument; allowed: {allowed}; "
                          "other config keys: overrides=['key=value']")
    if isinstance(model, PersonalizedModel):
        layers.update({k: list(v) for k, v in (("local_layers", model.local_layers), ("sync_layers", model.sync_layers))
                       if v is not None})
        model = model.module
    if layers and personalization is None:
        personalization = "personal_layers"
    out = Path(out) if out is not None else Path("outputs") / "api" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    args = [f"progress={str(progress).lower()}", f"fairness={fairness.replace('-', '_')}",
            f"privacy={privacy.replace('-', '_')}"]
    if personalization is not None:
        args.append(f"personalization={personalization.replace('-', '_')}")
    if data is not None and client is not None:
        args.append("partition=natural_id")
    args += [f"{SETTINGS[k]}={v}" for k, v in settings.items()]
    args += [f"strategy.client.{key}={json.dumps(list(value))}" for key, value in layers.items()]
    args += list(overrides)
    check_group_choices(args)
    with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
        cfg = compose("config", overrides=args)
    OmegaConf.set_struct(cfg, False)
    ids: list = []
    if data is not None:
        cfg.dataset, ids = _dataset(data, out, label, client, features)
        if ids and "clients" not in settings:
            cfg.simulation.num_clients = len(ids)
            cfg.simulation.clients_per_round = min(cfg.simulation.clients_per_round, len(ids))
    if model is not None:
        import cloudpickle

        with open(out / "model.pkl", "wb") as f:
            cloudpickle.dump(model, f)
        cfg.model = {"name": "user_model",
                     "net": {"_target_": "octomil_sim.api.saved_model", "path": str((out / "model.pkl").resolve()),
                             "sha256": _sha256(out / "model.pkl")}}
    if groups is not None:
        if isinstance(groups, Mapping):  # keyed by the data's client ids (or partition ids without them)
            position = {str(c): i for i, c in enumerate(ids)}
            unknown = [k for k in groups if str(k) not in position] if ids else []
            if unknown:
                raise ConfigError(f"groups: client {unknown[0]!r} is not in the data's {client!r} column")
            path = out / "groups.json"
            path.write_text(json.dumps({str(position.get(str(k), k)): str(v) for k, v in groups.items()}))
            groups = path
        cfg.groups_file = str(Path(groups).resolve())
    results = Results(run(RunSpec.from_config(cfg), out), out)  # the typed spec, as the other front ends build it
    if ids:
        for row in results.raw["clients"]:
            row["client"] = ids[row["partition_id"]]
    return results
