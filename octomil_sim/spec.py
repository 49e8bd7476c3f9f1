"""The typed run spec: what one run is, as frozen dataclasses.

Three front ends build it once, at the edge: ``python -m octomil_sim`` (Hydra), ``octomil-sim train``
(flags mapped to Hydra overrides) and ``octomil_sim.simulate`` (Python objects). Each composes the Hydra
config and calls ``RunSpec.from_config``; from there on the runner, the data, the ClientApp (and the Ray
actors it runs in), the strategies' arguments and the logger take the spec, never the ``DictConfig``
(../shared/STYLE.md, "configuration at the edge"; pfl-research's frozen hyperparameter dataclasses).

A pluggable part (a partitioner, a model, a strategy's server and client halves, a fairness policy, a
dataset source) is a ``Component``: its import path and its resolved keyword arguments, built with
``Component.build``. ``RunSpec.config`` keeps the resolved config as plain data: it is the run's record
(``results.json``'s ``config``, the checkpoint's identity, W&B's config), never read for settings.

``from_config`` checks the shape (a group missing a key, or holding one no field reads, is one
``ConfigError`` line); ``octomil_sim.config.validate`` then checks the values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from octomil_sim.errors import ConfigError


@dataclass(frozen=True)
class Component:
    """A class or function (``target``, an import path) and the keyword arguments to build it with."""

    target: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, node: Any, key: str) -> "Component":
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(f"{key}={node!r}: allowed: a mapping with a _target_ (an import path) and its arguments")
        return cls(node["_target_"], {k: v for k, v in node.items() if k != "_target_"})

    def build(self, **extra):
        """The built object (Hydra's ``instantiate``: nested ``_target_`` arguments are built too);
        ``extra`` adds or replaces arguments."""
        from octomil_sim.errors import instantiate

        return instantiate({"_target_": self.target, **self.kwargs}, **extra)

    def get(self, name: str, default=None):
        return self.kwargs.get(name, default)

    @property
    def obj(self):
        """The class or function itself (imported, not built)."""
        from hydra.utils import get_object

        return get_object(self.target)

    def as_node(self) -> dict:
        return {"_target_": self.target, **self.kwargs}


@dataclass(frozen=True)
class DatasetSpec:
    """``conf/dataset``: where the rows come from and how to read them."""

    name: str
    source: Component
    feature_key: str
    label_key: str
    client_id_key: str | None
    input_shape: tuple[int, ...]
    num_classes: int
    scale: float = 1.0
    tokens: bool = False  # integer token ids (a token model), not scaled floats
    split_seed: int | None = None  # the per-client train/test split's seed (None: simulation.seed)
    vocab_size: int | None = None


@dataclass(frozen=True)
class PartitionSpec:
    """``conf/partition``: the flwr-datasets partitioner (``partitioner.kwargs`` as the YAML gives them)."""

    name: str
    partitioner: Component


@dataclass(frozen=True)
class ModelSpec:
    """``conf/model``: the network (built with the dataset's ``input_shape`` and ``num_classes``)."""

    name: str
    net: Component
    input_rank: int | None = None  # the rank of the inputs it needs (None: any)
    tokens: bool = False  # a token model


@dataclass(frozen=True)
class StrategySpec:
    """``conf/strategy`` (or ``personalization``): the Flower strategy and the client half."""

    name: str
    server: Component
    client: Component


@dataclass(frozen=True)
class FairnessSpec:
    """``conf/fairness``: a fairness policy composed with the personalization (``none``: no policy)."""

    name: str = "none"
    policy: Component | None = None
    client: Component | None = None


@dataclass(frozen=True)
class PrivacySpec:
    """``conf/privacy``: differential privacy of what clients upload (``none``: no DP). ``server``
    wraps the strategy (client-level DP); ``client`` is the local training's DP-SGD."""

    name: str = "none"
    server: Component | None = None
    client: Component | None = None


@dataclass(frozen=True)
class SimulationSpec:
    """``conf/simulation``: the federation, local training and the runtime (see its YAML's comments)."""

    num_clients: int
    clients_per_round: int
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    seed: int
    test_fraction: float
    fraction_evaluate: float
    local_steps: int | None = None
    train_all_clients: bool = False
    unseen_clients: float = 0.0
    num_cpus_per_client: float = 1
    num_gpus_per_client: float = 0.0
    backend: str = "ray"  # ray: ClientApps in Ray actors; local: in the driver's process (octomil_sim.local_backend)
    driver_node: bool = True  # ray, private instance, CPU clients: the driver runs one node in place of one actor
    ray_num_cpus: int | None = None
    ray_address: str | None = None
    startup_timeout_s: float = 300
    num_nodes: int | None = None
    checkpoint_every: int = 10
    state_store: str = "disk"
    state_dir: str | None = None
    vectorize: bool = True  # a message's clients train together where the algorithm and model allow


@dataclass(frozen=True)
class SystemSpec:
    """``conf/system``: resource classes ``{name: {share, max_steps, speed, dropout}}`` and the round's
    ``deadline``; ``octomil_sim.system.SystemModel`` checks and uses them."""

    name: str = "uniform"
    classes: dict = field(default_factory=lambda: {"full": {"share": 1.0}})
    deadline: float | None = None


@dataclass(frozen=True)
class LoggerSpec:
    """``conf/logger``: none, or W&B (``project``, ``mode``)."""

    name: str = "none"
    project: str | None = None
    mode: str | None = None


@dataclass(frozen=True, eq=False)
class RunSpec:
    """One run: every group of the config as a typed part, plus the run's record ``config`` (resolved)
    and the composed tree it came from, ``source`` (interpolations kept), which ``replace`` changes.
    Equal specs have equal ``key`` (and hash)."""

    dataset: DatasetSpec
    partition: PartitionSpec
    model: ModelSpec
    strategy: StrategySpec
    simulation: SimulationSpec
    fairness: FairnessSpec = FairnessSpec()
    privacy: PrivacySpec = PrivacySpec()
    system: SystemSpec = SystemSpec()
    logger: LoggerSpec = LoggerSpec()
    groups_file: str | None = None
    progress: bool = True
    config: dict = field(default_factory=dict)  # the resolved config, as a record only
    source: dict = field(default_factory=dict, repr=False)  # the composed config, interpolations kept

    @classmethod
    def from_config(cls, cfg) -> "RunSpec":
        """The spec of a composed config (a ``DictConfig`` or a plain dict, whose ``${...}``
        interpolations are resolved here)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        source = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else copy.deepcopy(dict(cfg))
        for name in ("hydra", "experiment", "personalization"):  # Hydra's own; an experiment / personalization
            source.pop(name, None)                                # only chose other groups (strategy=)
        try:
            tree = OmegaConf.to_container(OmegaConf.create(source), resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: {str(err).splitlines()[0]}") from None
        config, tree = tree, copy.deepcopy(tree)  # the typed parts share nothing with the record
        top = _take(tree, "", {"dataset", "partition", "model", "strategy", "fairness", "privacy", "simulation",
                               "system", "logger", "groups_file", "progress"}, required={"dataset", "partition", "model",
                                                                                 "strategy", "simulation"})
        d = dict(_group(top["dataset"], "dataset", DatasetSpec))
        d["source"] = Component.of(d["source"], "dataset.source")
        d["input_shape"] = tuple(d["input_shape"]) if isinstance(d["input_shape"], list) else d["input_shape"]
        p = _mapping(top["partition"], "partition")
        if "name" not in p:
            raise ConfigError("partition: no name; allowed: a conf/partition mapping with name and _target_")
        m = dict(_group(top["model"], "model", ModelSpec))
        m["net"] = Component.of(m["net"], "model.net")
        s = dict(_group(top["strategy"], "strategy", StrategySpec))
        s["server"], s["client"] = Component.of(s["server"], "strategy.server"), Component.of(s["client"], "strategy.client")
        f = _with_components(top.get("fairness"), "fairness", FairnessSpec, ("policy", "client"))
        pr = _with_components(top.get("privacy"), "privacy", PrivacySpec, ("server", "client"))
        return cls(
            dataset=DatasetSpec(**d),
            partition=PartitionSpec(p["name"], Component.of({k: v for k, v in p.items() if k != "name"}, "partition")),
            model=ModelSpec(**m),
            strategy=StrategySpec(**s),
            simulation=SimulationSpec(**_group(top["simulation"], "simulation", SimulationSpec)),
            fairness=FairnessSpec(**f),
            privacy=PrivacySpec(**pr),
            system=SystemSpec(**_group(top.get("system") or {}, "system", SystemSpec)),
            logger=LoggerSpec(**_group(top.get("logger") or {}, "logger", LoggerSpec)),
            groups_file=top.get("groups_file"),
            progress=top.get("progress", True),
            config=config,
            source=source,
        )

    def replace(self, **changes) -> "RunSpec":
        """The spec with ``group={key: value, ...}`` merged into its composed config and everything
        resolved again, as a command-line override does: ``spec.replace(simulation={"seed": 3})`` also
        moves what interpolates the seed (the data's generator, the partitioner). A top-level key
        (``groups_file``) takes its value as is."""
        from omegaconf import OmegaConf

        if not self.source:
            raise ConfigError("RunSpec.replace: this spec has no composed config (build it with RunSpec.from_config)")
        merged = OmegaConf.merge(OmegaConf.create(self.source), {k: _plain(v) for k, v in changes.items()})
        return RunSpec.from_config(merged)

    def check(self) -> None:
        """Raise ``ConfigError`` unless the typed parts are what the record ``config`` says (a spec made
        with ``RunSpec(...)`` or ``dataclasses.replace`` by hand can disagree with its record, which
        is what results.json and the checkpoint's identity are made from)."""
        if not self.config or RunSpec.from_config(self.config).key != self.key:
            raise ConfigError("run spec: its typed parts and its record (config) disagree; allowed: a spec from "
                              "RunSpec.from_config(...), changed with spec.replace(group={...})")

    @property
    def policy(self) -> Component | None:
        """The fairness policy's component when ``fairness`` names one, else None."""
        return self.fairness.policy

    @property
    def name(self) -> str:
        """``ditto + tilted on synthetic``: the personalization, the fairness policy if any, the data."""
        with_policy = f" + {self.fairness.name}" if self.policy else ""
        with_privacy = f" + {self.privacy.name}" if self.privacy.name != "none" else ""
        return f"{self.strategy.name}{with_policy}{with_privacy} on {self.dataset.name}"

    @cached_property
    def key(self) -> str:
        """The typed parts as one string: equal keys, equal specs (what per-process caches are keyed by)."""
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("config", "source")}
        return json.dumps(_plain(parts), sort_keys=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunSpec) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def _plain(value):
    """``value`` as JSON-able plain data: dataclasses (``Component``, the groups) as dicts with a
    component's ``_target_``, tuples as lists, mapping keys as strings."""
    if isinstance(value, Component):
        return _plain(value.as_node())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _mapping(node, key: str) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{key}={node!r}: allowed: a mapping (a conf/{key} YAML)")
    return node


def _take(node: dict, prefix: str, allowed: set[str], required: set[str]) -> dict:
    """``node``, with a one-line error for a key no field reads (naming the closest allowed one) or a
    required key missing."""
    import difflib

    for name in node:
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{name}: no part of octomil-sim reads this key{hint} (allowed under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(allowed))})")
    for name in sorted(required - set(node)):
        raise ConfigError(f"{prefix}{name}: missing; allowed: a value (see the conf/ YAML of this group)")
    return node


def _with_components(node, key: str, spec_type, parts: tuple[str, ...]) -> dict:
    """``_group`` of an optional group (absent: its defaults) whose ``parts`` are ``Component``s, None
    when not given (``fairness=none``, ``privacy=none``)."""
    out = dict(_group(node or {}, key, spec_type))
    for part in parts:
        out[part] = Component.of(out[part], f"{key}.{part}") if out.get(part) else None
    return out


def _group(node, key: str, spec_type) -> dict:
    """The keys of a group that ``spec_type``'s fields read, checked by ``_take``."""
    names = {f.name for f in fields(spec_type)}
    required = {f.name for f in fields(spec_type)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return _take(_mapping(node, key), f"{key}.", names, required)
