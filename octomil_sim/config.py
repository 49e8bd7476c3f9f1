"""Config checks that fail early, in one line naming the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from octomil_sim.errors import ConfigError, number_list
from octomil_sim.spec import RunSpec

GROUPS = ("dataset", "partition", "model", "strategy", "personalization", "fairness", "privacy", "simulation", "system", "logger",
          "experiment")


def config_dir() -> Path:
    """The Hydra config directory (``conf/`` in a checkout, ``octomil_sim/conf`` in a wheel)."""
    return Path(str(resources.files("octomil_sim.conf")))


#: more config folders on Hydra's search path (an ``octomil-sim init`` project's ``conf/``)
EXTRA_CONFIG_DIRS: list[Path] = []


def group_options(group: str) -> list[str]:
    return sorted({p.stem for d in (config_dir(), *EXTRA_CONFIG_DIRS) for p in (d / group).glob("*.yaml")})


def check_group_choices(overrides: list[str]) -> None:
    """Reject ``group=choice`` command-line overrides whose choice has no YAML in that group
    (Hydra's own message spans many lines); comma lists of multirun sweeps are checked item by item."""
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        key = key.split("@")[0]
        if not sep or key not in GROUPS or value in ("", "null"):
            continue
        allowed = group_options(key)
        for choice in value.split(","):
            if choice not in allowed:
                raise ConfigError(f"{key}={choice!r} is not a known {key}; allowed: {', '.join(allowed)}")


# Keys the runtime reads with a default although no YAML has to declare them.
OPTIONAL_KEYS = {"model.input_rank", "model.tokens", "dataset.tokens", "dataset.split_seed"}


def target_parameters(target: str) -> set[str] | None:
    """The keyword arguments a ``_target_`` accepts: its own and, through ``**kwargs``, those of the
    classes it passes them on to (the MRO, for a class); None when it takes any keyword at all."""
    from hydra.utils import get_object

    if target.startswith("flwr_datasets"):  # (its plotting subpackage stays unimported: data.hf_datasets)
        from octomil_sim.lazy_imports import defer_flwr_datasets_plots

        defer_flwr_datasets_plots()
    obj = get_object(target)
    functions = ([c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__ and c is not object]
                 if inspect.isclass(obj) else [obj])
    names: set[str] = set()
    for fn in functions:
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    # a class whose **kwargs reach object.__init__ accepts no more; a function's **kwargs accept anything
    return names if inspect.isclass(obj) else None


def known_keys(cfg: DictConfig) -> set[str]:
    """Every dotted key of ``cfg`` (hydra's own aside), plus ``<node>.<arg>`` for each argument of every
    ``_target_`` node, plus ``OPTIONAL_KEYS``."""
    keys = set(OPTIONAL_KEYS)

    def walk(node, prefix: str) -> None:
        if not OmegaConf.is_dict(node):
            return
        if "_target_" in node:
            try:
                keys.update(f"{prefix}{name}" for name in target_parameters(node._target_) or ())
            except Exception:  # an unimportable target is reported where it is built
                pass
        for name in node.keys():
            keys.add(f"{prefix}{name}")
            walk(node._get_node(name), f"{prefix}{name}.")

    walk(cfg, "")
    return keys


def closest_key(key: str, keys: set[str]) -> str | None:
    """The known key ``key`` most likely meant: a key ending in the same (or a close) last name, or a
    close full path."""
    last = key.rsplit(".", 1)[-1]
    by_last = {k: k.rsplit(".", 1)[-1] for k in keys}
    close_last = set(difflib.get_close_matches(last, set(by_last.values()), n=3, cutoff=0.75))
    pool = [k for k, name in by_last.items() if name in close_last] or list(keys)
    matches = difflib.get_close_matches(key, pool, n=1, cutoff=0.0 if close_last else 0.75)
    return matches[0] if matches else None


def _without(cfg: DictConfig, keys: list[str]) -> DictConfig:
    """A copy of ``cfg`` without ``keys`` (and without the mappings they leave empty)."""
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in keys:
        parts = key.split(".")
        while parts:
            parent = OmegaConf.select(base, ".".join(parts[:-1])) if len(parts) > 1 else base
            if not OmegaConf.is_dict(parent) or parts[-1] not in parent:
                break
            child = parent[parts[-1]]
            if parts == key.split(".") or (OmegaConf.is_dict(child) and not child):
                parent.pop(parts[-1])
                parts = parts[:-1]
            else:
                break
    return base


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Reject a ``+key=value`` override whose key no config declares and no built object accepts
    (``+simulaton.rounds=3`` would otherwise add a key nobody reads and run 100 rounds), naming the
    closest valid key. ``+group=choice`` (a config group) and ``hydra.*`` are Hydra's."""
    added = []
    for item in overrides:
        key = item.lstrip("+").partition("=")[0].split("@")[0]
        # "++key" adds *or overrides*: it may name an existing key, so it is taken as intended
        if item.startswith("+") and not item.startswith("++") and not key.startswith("hydra.") \
                and key.split("/")[0] not in GROUPS:
            added.append((item, key))
    if not added:
        return
    known = known_keys(_without(cfg, [key for _, key in added]))
    for item, key in added:
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else None
        accepts_any = OmegaConf.is_dict(node) and "_target_" in node and target_parameters(node._target_) is None
        if key in known or accepts_any:
            continue
        hint = closest_key(key, known)
        suggestion = f"; did you mean {hint}?" if hint else ""
        raise ConfigError(f"{item}: no config or component reads {key}{suggestion} (+ adds a new key; change an "
                          "existing one without +)")


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_partition(spec: RunSpec) -> None:
    """The partitioner's own arguments, which flwr-datasets checks only once a client loads its data
    (in a Ray actor, as a traceback) or not at all (a Dirichlet alpha of 0)."""
    p = spec.partition.partitioner
    target, get = p.target, p.get
    if target.endswith("DirichletPartitioner"):
        alphas = number_list(get("alpha"))
        _require("partition.alpha", get("alpha"), alphas is not None and all(a > 0 for a in alphas),
                 "a number > 0, or a list of such numbers (one per client)")
        _require("partition.min_partition_size", get("min_partition_size"), _is_int(get("min_partition_size"), 0),
                 "an integer >= 0")
    elif target.endswith("PathologicalPartitioner"):
        classes, per = spec.dataset.num_classes, get("num_classes_per_partition")
        _require("partition.num_classes_per_partition", per, _is_int(per, 1) and per <= classes,
                 f"an integer in 1..{classes} (dataset={spec.dataset.name} has {classes} classes)")
        modes = ("random", "first-deterministic", "deterministic")
        _require("partition.class_assignment_mode", get("class_assignment_mode"), get("class_assignment_mode") in modes,
                 ", ".join(modes))
    elif target.endswith("ShardPartitioner"):
        _require("partition.num_shards_per_partition", get("num_shards_per_partition"),
                 get("num_shards_per_partition") is None or _is_int(get("num_shards_per_partition"), 1),
                 "null or an integer >= 1")
        _require("partition.shard_size", get("shard_size"), get("shard_size") is None or _is_int(get("shard_size"), 1),
                 "null or an integer >= 1")


def check_output_paths(output_dir: Path) -> None:
    """The run directory and what a run writes into it are of the right kind and writable, checked
    before any work starts (a results path that is a folder used to fail only after every round)."""
    output_dir = Path(output_dir)
    _require("hydra.run.dir", str(output_dir), not output_dir.exists() or output_dir.is_dir(),
             "a directory (this path is a file)")
    for name, kind in (("results.json", "file"), ("results.png", "file"), ("checkpoint", "directory")):
        path = output_dir / name
        wrong = path.exists() and (path.is_dir() if kind == "file" else not path.is_dir())
        _require("hydra.run.dir", str(output_dir), not wrong, f"a run directory whose {name} is a {kind} (it is not: "
                 f"move {path} away)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ConfigError(f"hydra.run.dir={str(output_dir)!r}: cannot write there ({err.strerror or err}); "
                          "allowed: a writable directory") from None


def _require(key: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: allowed: {allowed}")


def client_slots(s) -> int:
    """The processes that run a run's clients on this machine at once: ``simulation.ray_num_cpus`` (or
    all CPUs) over ``num_cpus_per_client`` and, with a GPU share, no more than this machine's GPUs hold
    (dividing as Flower's ``pool_size_from_resources`` does: 1 GPU / 0.1 is 10); 1 for the local
    backend. The client actors and, with ``driver_runs_node``, the driver (``ray_actors``)."""
    if s.backend != "ray":
        return 1
    slots = max(1, int((s.ray_num_cpus or os.cpu_count() or 1) // s.num_cpus_per_client))
    if s.num_gpus_per_client and s.ray_address is None:  # a cluster's GPUs are its nodes' business
        import torch

        slots = max(1, min(slots, int(torch.cuda.device_count() / s.num_gpus_per_client)))
    return slots


def driver_runs_node(s) -> bool:
    """Whether the driver runs one Flower node's clients itself, in place of one client actor
    (``simulation.driver_node``; ``octomil_sim.local_ray.driver_node_backend``): on a private local Ray
    instance (a cluster's driver may sit on a login node), with CPU clients (the driver is given no
    GPU share), and with room for at least one actor beside it."""
    return (s.backend == "ray" and bool(s.driver_node) and s.ray_address is None and not s.num_gpus_per_client
            and client_slots(s) >= 2)


def num_nodes(spec, saved_nodes: int | None = None) -> int:
    """Flower nodes to simulate: ``simulation.num_nodes``, or one per client process (``client_slots``:
    the Ray actors and, with ``simulation.driver_node``, the driver; one for the local backend, which
    runs one message at a time); never more than clients. A resumed run keeps the count its
    checkpoint's run had (``saved_nodes``; ``runner.saved_num_nodes``) unless ``simulation.num_nodes``
    is set: which clients share a message is what cohort-vectorized training's float rounding
    depends on, so another count (another machine, a ``--jobs`` share of the CPUs) would part the
    resumed run from the uninterrupted one."""
    s = spec.simulation
    return min(s.num_nodes or saved_nodes or client_slots(s), s.num_clients)


def ray_actors(s) -> int:
    """The client actors a run starts on this machine: ``client_slots``, less the driver's own node
    (``driver_runs_node``); 1 for the local backend."""
    return client_slots(s) - driver_runs_node(s)


def validate(spec: RunSpec) -> None:
    """Value checks of a run spec that its types cannot say; raises ``ConfigError``."""
    s = spec.simulation
    _require("simulation.num_clients", s.num_clients, isinstance(s.num_clients, int) and s.num_clients >= 1, "an integer >= 1")
    _require("simulation.clients_per_round", s.clients_per_round,
             isinstance(s.clients_per_round, int) and 1 <= s.clients_per_round <= s.num_clients,
             f"an integer in 1..simulation.num_clients ({s.num_clients})")
    _require("simulation.rounds", s.rounds, isinstance(s.rounds, int) and s.rounds >= 1, "an integer >= 1")
    _require("simulation.local_epochs", s.local_epochs, isinstance(s.local_epochs, int) and s.local_epochs >= 1, "an integer >= 1")
    _require("simulation.local_steps", s.local_steps, s.local_steps is None
             or (isinstance(s.local_steps, int) and s.local_steps >= 1), "null or an integer >= 1")
    _require("simulation.train_all_clients", s.train_all_clients, isinstance(s.train_all_clients, bool),
             "true, false")
    _require("simulation.vectorize", s.vectorize, isinstance(s.vectorize, bool), "true, false")
    _require("simulation.batch_size", s.batch_size, isinstance(s.batch_size, int) and s.batch_size >= 1, "an integer >= 1")
    _require("simulation.lr", s.lr, isinstance(s.lr, (int, float)) and s.lr > 0, "a number > 0")
    _require("simulation.test_fraction", s.test_fraction, 0 < s.test_fraction < 1, "a number in (0, 1)")
    _require("simulation.fraction_evaluate", s.fraction_evaluate, 0 <= s.fraction_evaluate <= 1, "a number in [0, 1]")
    _require("simulation.num_cpus_per_client", s.num_cpus_per_client, s.num_cpus_per_client > 0, "a number > 0")
    gpus = s.num_gpus_per_client
    _require("simulation.num_gpus_per_client", gpus, isinstance(gpus, (int, float)) and 0 <= gpus <= 1,
             "a number in [0, 1]: 0 trains on the CPU, a share of one GPU trains each client on a GPU")
    if gpus and s.ray_address is None:  # a cluster's GPUs are its nodes' business
        import torch

        _require("simulation.num_gpus_per_client", gpus, torch.cuda.is_available(),
                 "0 on this machine: torch sees no CUDA device (torch.cuda.is_available() is False)")
    unseen = s.unseen_clients or 0
    _require("simulation.unseen_clients", unseen, isinstance(unseen, (int, float)) and 0 <= unseen < 1
             and s.num_clients - round(unseen * s.num_clients) >= s.clients_per_round,
             f"a share in [0, 1) that leaves at least simulation.clients_per_round ({s.clients_per_round}) of the "
             f"{s.num_clients} clients to train")
    _require("simulation.startup_timeout_s", s.startup_timeout_s,
             isinstance(s.startup_timeout_s, (int, float)) and s.startup_timeout_s > 0, "a number of seconds > 0")
    _require("simulation.state_store", s.state_store, s.state_store in ("disk", "memory"), "disk, memory")
    _require("simulation.num_nodes", s.num_nodes, s.num_nodes is None or (isinstance(s.num_nodes, int) and s.num_nodes >= 1),
             "null or an integer >= 1")
    _require("simulation.checkpoint_every", s.checkpoint_every, isinstance(s.checkpoint_every, int) and s.checkpoint_every >= 0,
             "an integer >= 0 (0: no checkpoints)")
    _require("simulation.backend", s.backend, s.backend in ("ray", "local"),
             "ray (clients in Ray actors), local (clients in the driver's process)")
    _require("simulation.backend", s.backend, s.backend == "ray" or s.ray_address is None,
             f"ray when joining a Ray cluster (simulation.ray_address={s.ray_address!r})")
    _require("simulation.ray_address", s.ray_address, s.ray_address is None
             or (isinstance(s.ray_address, str) and bool(s.ray_address.strip())),
             "null (a private local Ray instance), auto, or host:port of a running Ray cluster")
    _require("simulation.ray_num_cpus", s.ray_num_cpus, s.ray_num_cpus is None or s.ray_address is None,
             "null when joining a cluster (simulation.ray_address): its nodes set their own CPUs")
    _require("simulation.num_cpus_per_client", s.num_cpus_per_client, s.ray_num_cpus is None
             or s.num_cpus_per_client <= s.ray_num_cpus,
             f"at most simulation.ray_num_cpus ({s.ray_num_cpus}): no client actor could start otherwise")
    _require("simulation.driver_node", s.driver_node, isinstance(s.driver_node, bool), "true, false")
    slots, actors = client_slots(s), ray_actors(s)
    _require("simulation.state_store", s.state_store, s.state_store == "disk" or slots <= 1,
             f"disk with {slots} client processes ({actors} Ray actor{'s' * (actors != 1)}"
             f"{' and the driver' if driver_runs_node(s) else ''}; memory only with one: "
             "simulation.ray_num_cpus=simulation.num_cpus_per_client, or with simulation.backend=local)")
    _require("simulation.state_store", s.state_store, s.state_store == "disk" or not s.checkpoint_every,
             "disk when checkpointing (checkpoints do not hold the memory store; set simulation.checkpoint_every=0)")
    check_partition(spec)
    if spec.groups_file:
        from octomil_sim.metrics import load_groups

        load_groups(spec.groups_file, s.num_clients)
    rank, d, m = spec.model.input_rank, spec.dataset, spec.model
    _require("dataset", d.name, rank is None or len(d.input_shape) == rank,
             f"model={m.name} needs {rank}-d inputs; datasets with them: mnist5k, femnist")
    _require("model", m.name, bool(m.tokens) == bool(d.tokens),
             "a token model (prompt_transformer) for token data (synthetic_tokens), another model otherwise")
    from octomil_sim.client_app import build_model
    from octomil_sim.system import SystemModel

    SystemModel.of_run(spec)

    client, model = spec.strategy.client.build(), build_model(spec)
    if not client.frozen_parameters_ok and any(not p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model={spec.model.name}: its base is frozen, and strategy={spec.strategy.name}'s update "
                          "writes every parameter; allowed: fedavg, finetune, ditto, personal_layers, prompt_tuning, "
                          "hierarchical, maxfl, tilted, qffl, bounded_group_loss (or another model)")
    client.check(model)
    from octomil_sim.runner import build_strategy

    check_fairness(spec)
    build_strategy(spec, sizes=False)  # its own checks (p, sparsity, ...), the privacy wrapper's
    if spec.privacy.client is not None:
        s = spec.simulation
        private = spec.privacy.client.build(max_trainings=s.rounds)  # as client_runtime builds it
        if private.trains:
            from strategies.dp import check_dp_sgd

            check_dp_sgd(spec.strategy.client.obj)
            # a budget no noise can meet fails here, for a client of five batches
            private.noise(5 * s.batch_size, s.batch_size, s.local_steps or 5 * s.local_epochs)


def composes_with_fairness(strategy: str) -> bool:
    """Whether ``strategy``'s server half takes a fairness policy: a personalization (or FedAvg), not a
    fairness strategy of its own."""
    node = OmegaConf.load(config_dir() / "strategy" / f"{strategy}.yaml")
    return strategy not in group_options("fairness") and "fairness" in (target_parameters(node.server._target_) or ())


def check_fairness(spec: RunSpec) -> None:
    """``fairness=<policy>`` goes with a personalization whose aggregation can weight its clients."""
    if not spec.policy:
        return
    fairness, name = spec.fairness.name, spec.strategy.name
    if name in group_options("fairness"):
        raise ConfigError(f"fairness={fairness}: strategy={name} is a fairness method itself; allowed: "
                          f"fairness=none, or personalization=fedavg fairness={name}")
    if "fairness" not in (target_parameters(spec.strategy.server.target) or ()):
        allowed = [s for s in group_options("strategy") if composes_with_fairness(s)]
        raise ConfigError(f"fairness={fairness}: strategy={name} does not weight its clients; allowed "
                          f"personalizations: {', '.join(allowed)} (or fairness=none)")


def fairness_kwargs(spec: RunSpec) -> dict:
    """``{"fairness": policy}`` for the strategy's constructor when ``fairness`` names one, else nothing."""
    from strategies.fedavg import policy_under

    policy = spec.policy
    return {"fairness": policy_under("fairness.policy.", policy.build)} if policy else {}
