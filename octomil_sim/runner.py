"""Runs one configured experiment through Flower's simulation engine and writes its results.

``run(spec, output_dir)`` checks the run spec (``octomil_sim.spec``), loads the data once (so a
missing dataset fails before Ray starts), builds the ServerApp and ClientApp, runs them on the Ray backend (one Flower node per
Ray actor, each carrying a share of the round's clients) and writes ``results.json`` and
``results.png`` into ``output_dir``. If ``output_dir`` holds a checkpoint of the same experiment, the
run resumes from it (``octomil_sim.checkpoint``), saying so in one log line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from octomil_sim.checkpoint import RawJSON, encode, load_checkpoint, restore_client_state, save_checkpoint
from octomil_sim.client_app import build_client_app, build_initial_model
from octomil_sim.config import client_slots, driver_runs_node, fairness_kwargs, num_nodes, validate
from octomil_sim.client_data import ClientsFile
from octomil_sim.data import FederatedData, cache_source, clients_file, federated_data
from octomil_sim.errors import ConfigError
from octomil_sim.interrupt import Interrupted, StopRequest, stop_on_signals
from octomil_sim.loggers import make_logger
from octomil_sim.metrics import (
    DEFINITIONS,
    best_rounds,
    evaluate_aggregation,
    group_summaries,
    load_groups,
    summarize_clients,
    train_aggregation,
    worst_group_improvement,
)
from octomil_sim.reaper import Reaper
from octomil_sim.server_app import Session, SimulationGrid, build_server_app
from octomil_sim.spec import RunSpec, SimulationSpec
from octomil_sim.system import SystemModel

log = logging.getLogger(__name__)


_STATM: tuple[int, int] | None = None  # (pid, an open /proc/self/statm of it): read again at every round's row


def driver_rss_mb() -> float:
    """Resident memory of this (the driver) process in MB: the ServerApp's side of the run."""
    global _STATM
    try:
        if _STATM is None or _STATM[0] != os.getpid():  # (a forked child reads its own)
            _STATM = os.getpid(), os.open("/proc/self/statm", os.O_RDONLY)
        pages = int(os.pread(_STATM[1], 200, 0).split()[1])  # (0.01 ms; opening the file each time, 0.15 ms)
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):  # not Linux: peak instead of current
        _STATM = None  # (the next row tries again)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def strategy_kwargs(spec: RunSpec) -> dict:
    """Sampling and metric-aggregation arguments every Flower strategy of the framework takes."""
    s = spec.simulation
    seen = s.num_clients - len(unseen_clients(spec))
    n_eval = max(1, round(s.fraction_evaluate * seen)) if s.fraction_evaluate > 0 else 0
    return {
        "seed": s.seed,
        "train_all_clients": bool(s.train_all_clients),
        "fraction_train": s.clients_per_round / seen,
        "min_train_nodes": s.clients_per_round,
        "fraction_evaluate": s.fraction_evaluate,
        "min_evaluate_nodes": n_eval,
        "min_available_nodes": seen,
        "train_metrics_aggr_fn": train_aggregation,
        "evaluate_metrics_aggr_fn": functools.partial(evaluate_aggregation, groups=run_groups(spec)),
    }


def run_groups(spec: RunSpec) -> dict[int, str] | None:
    """``groups_file``'s {client: group}, or None."""
    return load_groups(spec.groups_file, spec.simulation.num_clients) if spec.groups_file else None


def unseen_clients(spec: RunSpec) -> list[int]:
    """The held-out clients (``simulation.unseen_clients``, a share of all): never sampled for training
    or per-round evaluation, evaluated at the end with the global model and after the algorithm's
    personalization step, as a device that joins after training would be (MaxFL's and PFLlib's "new
    clients"). Drawn by the run's seed; none by default."""
    s = spec.simulation
    count = round(float(s.unseen_clients or 0) * s.num_clients)
    if count == 0:
        return []
    rng = np.random.default_rng([s.seed, 31])
    return sorted(int(c) for c in rng.choice(s.num_clients, size=count, replace=False))


def client_sizes(spec: RunSpec) -> dict:
    """``{"client_sizes": [n_k]}`` (training examples per client) for a strategy that samples clients
    by size (``strategy.server.sampling=size_proportional``), else nothing."""
    if spec.strategy.server.get("sampling") != "size_proportional":
        return {}
    written = clients_file(spec)  # (the data check wrote it)
    if written is not None and written.exists():  # every partition's row count: 8 s at 10,000 clients, none from the file
        data = ClientsFile(spec, written)
    elif clients_here(spec):
        data = federated_data(spec)  # (kept for the clients in this process)
    else:
        data = FederatedData(spec)
    unseen = set(unseen_clients(spec))  # a held-out client is never drawn
    return {"client_sizes": [0 if k in unseen else data.num_train(k) for k in range(data.num_clients)]}


def build_strategy(spec: RunSpec, sizes: bool = True):
    """The run's Flower strategy: the personalization's server half with its fairness policy, wrapped
    in the privacy group's DP (``privacy.server``) when there is one. ``sizes=False``: without the
    client sizes (which load the data; for checking a config)."""
    strategy = spec.strategy.server.build(**strategy_kwargs(spec), **(client_sizes(spec) if sizes else {}),
                                          **fairness_kwargs(spec))
    if spec.privacy.server is None:
        return strategy
    s = spec.simulation
    return spec.privacy.server.build(strategy=strategy, num_clients=s.num_clients - len(unseen_clients(spec)),
                                     clients_per_round=s.clients_per_round, rounds=s.rounds, seed=s.seed)


def initial_arrays(spec: RunSpec) -> ArrayRecord:
    torch.manual_seed(spec.simulation.seed)  # the driver's RNG after this point stays what it always was
    return ArrayRecord(build_initial_model(spec).state_dict())


class RunSession(Session):
    """Records per-round and per-client numbers into ``results.json``'s structure, checkpoints every
    ``simulation.checkpoint_every`` rounds, and resumes from ``saved``, the state of the checkpoint
    ``resume_point`` chose. ``started``: the ``time.perf_counter()`` the run's wall time counts from."""

    def __init__(self, spec: RunSpec, output_dir: Path, saved: dict | None, started: float, num_nodes: int = 1):
        self.spec, self.output_dir, self.saved, self.started = spec, output_dir, saved, started
        self.num_nodes = num_nodes  # the Flower nodes this run has (``config.num_nodes``): checkpoints keep it
        self.environment = environment_report()  # before the run starts (``runtime_report``)
        self.rows: list[dict] = []
        self._row_texts: list[str] = []  # each row's JSON, made once (checkpoints write them all: ``RawJSON``)
        self._counted = {"failed_clients": 0, "stragglers": 0}  # the rows' sums so far
        self.results: dict | None = None
        self.checkpointed = saved["round"] if saved else 0  # the round of the newest checkpoint
        self.stopped_after: int | None = None  # set when a signal stopped the run
        self.error: Exception | None = None  # set when the run could not go on (``failed``)
        self._bytes: dict[str, int] = {}
        self._last = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[latest]}"),
            disable=not spec.progress,
        )
        self.task = self.progress.add_task(f"{spec.name}: rounds", total=spec.simulation.rounds, latest="")
        self.logger = make_logger(spec, output_dir)  # logs each round as it ends (W&B: live)

    def start(self, strategy, grid: SimulationGrid) -> tuple[ArrayRecord, int]:
        saved = self.saved
        self.strategy = strategy
        if saved is None:
            arrays = initial_arrays(self.spec)
            if hasattr(strategy, "initial_arrays"):  # e.g. one model per group, each from its own seed
                seed = self.spec.simulation.seed
                arrays = strategy.initial_arrays(
                    arrays, lambda j: ArrayRecord(build_initial_model(self.spec, seed + j).state_dict()))
            return arrays, 1
        restore_strategy_state(strategy, saved["strategy"])
        restore_grid_counters(grid, saved["grid"])
        self.rows, self._bytes = saved["rows"], dict(grid.bytes)
        if self.spec.simulation.checkpoint_every:  # only checkpoints write them
            self._row_texts = [json.dumps(row) for row in self.rows]  # (read from JSON: plain already)
        self._counted = {key: sum(r.get(key, 0) for r in self.rows) for key in self._counted}
        for row in self.rows:  # the logger sees the whole run (the interrupted part first)
            self.logger.log_round(row)
        self.progress.advance(self.task, saved["round"])
        return ArrayRecord(saved["arrays"]), saved["round"] + 1

    def after_round(self, server_round, arrays, train_metrics, evaluate_metrics, strategy, grid) -> None:
        now, so_far = time.perf_counter(), dict(grid.bytes)
        self.rows.append({
            "round": server_round, **dict(train_metrics or {}), **dict(evaluate_metrics or {}),
            "bytes_up": so_far.get("train_up", 0) - self._bytes.get("train_up", 0),
            "bytes_down": so_far.get("train_down", 0) - self._bytes.get("train_down", 0),
            "failed_clients": sum(grid.failed.values()) - self._counted["failed_clients"],
            "stragglers": sum(grid.straggled.values()) - self._counted["stragglers"],
            "time_s": now - self._last,
            "driver_rss_mb": driver_rss_mb(),
        })
        self._bytes, self._last = so_far, now
        row = self.rows[-1]
        for key in self._counted:
            self._counted[key] += row[key]
        if self.spec.simulation.checkpoint_every:
            document, tensors = encode(row)  # as the checkpoint's encoding writes it
            if tensors:
                raise TypeError(f"round {server_round}'s row holds arrays ({', '.join(tensors)}); rows hold numbers")
            self._row_texts.append(json.dumps(document))
        self.logger.log_round(row)
        latest = {k: row[k] for k in ("global_acc", "personalized_acc") if k in row}
        self.progress.update(self.task, advance=1, **({"latest": "  ".join(f"{k} {v:.3f}" for k, v in latest.items())}
                                                     if latest else {}))
        if self.checkpoints_after(server_round):
            self.checkpoint(server_round, arrays, strategy, grid)

    def checkpoints_after(self, server_round: int) -> bool:
        every = self.spec.simulation.checkpoint_every
        return bool(every) and (server_round % every == 0 or server_round == self.spec.simulation.rounds)

    def checkpoint(self, server_round: int, arrays, strategy, grid: SimulationGrid) -> None:
        save_checkpoint(self.output_dir, server_round, {
            "round": server_round, "config": self.spec.config, "num_nodes": self.num_nodes,
            "arrays": arrays.to_torch_state_dict(), "strategy": strategy_state(strategy),
            "rows": RawJSON(f"[{', '.join(self._row_texts)}]"), "grid": grid_counters(grid), "wall_time_s": time.perf_counter() - self.started,
        }, client_state_dir(self.spec))
        self.checkpointed = server_round

    def stopped(self, last_round: int, arrays, strategy, grid: SimulationGrid) -> None:
        """A signal stopped the run after ``last_round``: checkpoint that round (unless it just was, or
        checkpoints are off) so that nothing done is lost."""
        self.stopped_after = last_round
        if self.spec.simulation.checkpoint_every and last_round and self.checkpointed != last_round:
            self.checkpoint(last_round, arrays, strategy, grid)

    def failed(self, error: Exception) -> None:
        self.error = error

    def end_logging(self, summary: dict) -> None:
        """Finish the logger once, with ``summary`` (later calls do nothing)."""
        if self.logger is not None:
            self.logger.finish(summary)
            self.logger = None

    def done(self, arrays, rows: list[dict], grid: SimulationGrid, averaged_rows: list[dict] | None = None) -> None:
        clients = client_table(rows)
        unseen = set(unseen_clients(self.spec))
        if unseen:
            for c in clients:
                c["unseen"] = int(c["partition_id"] in unseen)
        trained = [c for c in clients if c["partition_id"] not in unseen]  # what final and groups are over
        total_bytes = dict(grid.bytes)
        final = summarize_clients(trained, weight_key="num_test")
        final.update({
            "bytes_up": total_bytes.get("train_up", 0),
            "bytes_down": total_bytes.get("train_down", 0),
            "bytes_evaluate_down": total_bytes.get("evaluate_down", 0),
            "driver_rss_mb": driver_rss_mb(),
            "best_round": best_rounds(self.rows),
        })
        results = {
            "metric_definitions": DEFINITIONS,
            "name": self.spec.name,
            "config": self.spec.config,
            "rounds": self.rows,
            "clients": clients,
            "final": final,
            "system": system_report(self.spec, grid),
            "runtime": runtime_report(self.spec, self.num_nodes, self.environment),
            **fairness_report(self.spec, trained),
        }
        if hasattr(getattr(self, "strategy", None), "privacy_report"):
            results["privacy"] = self.strategy.privacy_report()
        elif self.spec.privacy.client is not None and (summary := self.spec.privacy.client.build().summary(trained)):
            results["privacy"] = summary
        results["worst_group_improvement"] = worst_group_improvement(results.get("groups"), final)
        if unseen:  # the held-out clients apart: ``final`` is over the clients that trained
            results["unseen_clients"] = {
                "clients": sorted(unseen),
                "final": summarize_clients([c for c in clients if c["partition_id"] in unseen], weight_key="num_test"),
            }
        if averaged_rows is not None:  # e.g. bounded group loss: its guarantee is about the averaged iterate
            averaged = [c for c in client_table(averaged_rows) if c["partition_id"] not in unseen]
            results["averaged_iterate"] = {"final": summarize_clients(averaged, weight_key="num_test"),
                                                **fairness_report(self.spec, averaged)}
        self.results = results


def client_table(rows: list[dict]) -> list[dict]:
    """Evaluation rows as ``results.json``'s ``clients``: ids and test sizes renamed, in client order."""
    return sorted(({"partition_id": int(c.pop("partition-id")), "num_test": int(c.pop("num-examples")), **c}
                   for c in rows), key=lambda c: c["partition_id"])


def strategy_state(strategy) -> dict:
    """The strategy's attributes that a resumed run needs: those its class names in ``round_state``
    (e.g. bounded group loss's dual variables and averages), the ones rounds carry forward. The
    constructor rebuilds everything else from the same config (``check_same_experiment``), so
    hyperparameters, callables and per-round handles are not saved."""
    return {name: _attribute(strategy, name)[0] for name in getattr(strategy, "round_state", ())}


def _attribute(strategy, name: str):
    """(the value of ``name``, the object holding it, its last part); ``fairness.mu`` is ``mu`` of
    the strategy's fairness policy."""
    *holder, attr = name.split(".")
    owner = strategy
    for part in holder:
        owner = getattr(owner, part)
    return getattr(owner, attr), owner, attr


def restore_strategy_state(strategy, saved: dict) -> None:
    """Put ``strategy_state``'s values back."""
    for name, value in saved.items():
        if "." not in name and not hasattr(strategy, name) and hasattr(getattr(strategy, "fairness", None), name):
            name = f"fairness.{name}"  # saved before fairness became a policy (tilted's log_normalizer, BGL's mu)
        _, owner, attr = _attribute(strategy, name)
        setattr(owner, attr, value)


def grid_counters(grid: SimulationGrid) -> dict:
    """The grid's byte and failure counters as checkpoint state (client ids as strings: JSON keys)."""
    return {"bytes": dict(grid.bytes), "failed": {str(c): n for c, n in grid.failed.items()},
            "straggled": {str(c): n for c, n in grid.straggled.items()},
            "last_failure": {str(c): r for c, r in grid.last_failure.items()},
            "work": {str(c): w for c, w in grid.work.items()}}


def restore_grid_counters(grid: SimulationGrid, saved: dict) -> None:
    """Put ``grid_counters``' numbers back into a fresh grid."""
    grid.bytes.update(saved["bytes"])
    grid.failed.update({int(c): n for c, n in saved["failed"].items()})
    grid.straggled.update({int(c): n for c, n in saved["straggled"].items()})
    grid.last_failure.update({int(c): r for c, r in saved["last_failure"].items()})
    grid.work.update({int(c): w for c, w in saved.get("work", {}).items()})  # absent in older checkpoints


def client_state_dir(spec: RunSpec) -> Path | None:
    """The disk client-state store's folder, which checkpoints snapshot; None for the memory store."""
    return Path(spec.simulation.state_dir) if spec.simulation.state_store == "disk" else None


#: keys that may differ between a checkpointed run and its resumption
RESUMABLE_CHANGES = {"simulation.rounds", "simulation.checkpoint_every", "simulation.ray_address", "progress", "logger",
                     "simulation.startup_timeout_s", "simulation.vectorize",
                     "simulation.ray_num_cpus", "simulation.backend", "simulation.num_gpus_per_client",
                     "simulation.driver_node"}  # resources: a --jobs sweep resumed with another N or alone
#: keys added since checkpoints were first written, with the value that means what their absence meant
ADDED_KEYS = {"simulation.unseen_clients": 0.0, "simulation.backend": "ray", "fairness.name": "none", "fairness.policy": None,
              "fairness.client": None, "privacy.name": "none"}


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def check_same_experiment(saved: dict, spec: RunSpec, output_dir: Path, saved_nodes: int | None = None) -> None:
    """A checkpoint resumes only the experiment that wrote it (more rounds are allowed). Where the
    checkpoint says how many Flower nodes its run had (``saved_nodes``), ``simulation.num_nodes`` is
    checked against that count (``check_same_nodes``) instead of against the key as it was set."""
    old, new = _flatten(saved), _flatten(spec.config)
    if saved_nodes is not None:
        check_same_nodes(saved_nodes, spec, output_dir)
        old.pop("simulation.num_nodes", None)
        new.pop("simulation.num_nodes", None)
    for key in sorted(set(old) | set(new)):
        if key not in old and key in ADDED_KEYS and new.get(key) == ADDED_KEYS[key]:
            continue
        if old.get(key) != new.get(key) and not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            raise ConfigError(f"{key}={new.get(key)!r}: the checkpoint in {output_dir} was made with "
                              f"{key}={old.get(key)!r}; allowed: the same experiment (only simulation.rounds "
                              "may grow), or a new hydra.run.dir")


def check_same_nodes(saved_nodes: int, spec: RunSpec, output_dir: Path) -> None:
    """A resumed run keeps its checkpoint's Flower node count (``num_nodes``): ``simulation.num_nodes``
    unset, or set to that count (a ``--jobs`` sweep's jobs set it: ``__main__.share_cpus``)."""
    given = spec.simulation.num_nodes
    if given is not None and min(given, spec.simulation.num_clients) != saved_nodes:
        raise ConfigError(f"simulation.num_nodes={given}: the checkpoint in {output_dir} was made with {saved_nodes} "
                          f"Flower nodes (which clients share a message, and so the numbers); allowed: {saved_nodes} "
                          "or null (the checkpoint's count), or a new hydra.run.dir")


def check_rounds(saved_round: int, spec: RunSpec, output_dir: Path) -> None:
    """A run resumes forward only: fewer rounds than its checkpoint would report rounds past
    ``simulation.rounds`` and overwrite the longer run's results."""
    rounds = spec.simulation.rounds
    if rounds < saved_round:
        raise ConfigError(f"simulation.rounds={rounds}: the run dir {output_dir} holds a checkpoint at round "
                          f"{saved_round}; allowed: >= {saved_round}, or another hydra.run.dir")


def saved_num_nodes(saved: dict) -> int | None:
    """The Flower nodes the run of checkpoint ``saved`` had: its ``num_nodes``, or for a checkpoint
    from before it was kept, the count its config gives on this machine (None if that cannot be read)."""
    if saved.get("num_nodes"):
        return int(saved["num_nodes"])
    try:
        return num_nodes(SimpleNamespace(simulation=SimpleNamespace(**{"backend": "ray", **saved["config"]["simulation"]})))
    except (KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None


def resume_point(spec: RunSpec, output_dir: Path) -> dict | None:
    """The state of ``output_dir``'s newest readable checkpoint, checked against ``spec`` and with the
    client-state store put back as it was then; None for a fresh run. Runs before Ray starts, so a
    wrong resumption stops with one line."""
    if (found := load_checkpoint(output_dir)) is None:
        return None
    folder, saved = found
    check_same_experiment(saved["config"], spec, output_dir, saved_num_nodes(saved))
    check_rounds(saved["round"], spec, output_dir)
    log.info("resuming from round %d (%s)", saved["round"], folder)
    restore_client_state(folder, client_state_dir(spec))
    return saved


def finished_results(saved: dict | None, spec: RunSpec, output_dir: Path) -> dict | None:
    """The results of a run that already finished in ``output_dir`` (its checkpoint is at
    ``simulation.rounds`` and its results.json was written after it), so that the same command, or a
    resumed ``-m`` sweep whose finished jobs share their folders with it, does not run it again."""
    rounds = spec.simulation.rounds
    results_file = output_dir / "results.json"
    if saved is None or saved["round"] != rounds or not results_file.is_file():
        return None
    try:
        results = json.loads(results_file.read_text())
    except ValueError:
        return None  # cut short while written: the final evaluation runs again
    if len(results.get("rounds", ())) != rounds:
        return None
    log.info("already finished: %s (simulation.rounds=%d); not run again", results_file, rounds)
    return results


def runtime_report(spec: RunSpec, nodes: int, environment: dict) -> dict:
    """How the run was laid out on this machine, beyond its config: its Flower nodes (which clients
    share a message: with cohort-vectorized training the numbers depend on it at float rounding, so
    ``simulation.num_nodes=<num_nodes>`` gives this run's numbers on another machine), the processes
    its clients ran in, whether the driver ran one node's clients, and ``environment_report``'s."""
    s = spec.simulation
    return {"num_nodes": nodes, "client_processes": client_slots(s), "driver_node": driver_runs_node(s),
            "environment": environment}


def environment_report() -> dict:
    """What besides the code and config decides a run's float rounding, as the driver's process sees
    it (a cluster's nodes may differ; a resumed run: where it was resumed): the versions of Python,
    PyTorch (and the CUDA it was built for), NumPy and Flower, the CPU, and the kernels PyTorch
    dispatches to on it (``torch.backends.cpu.get_cpu_capability``: the same run with
    ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine rounds its first round's training loss
    differently, by a few 1e-9). Made before the run starts; never raises (what it cannot read is
    ``error``): a record must not cost a run."""
    try:
        import platform

        import flwr

        cpu = None
        try:
            cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), None)
        except OSError:
            pass
        return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "numpy": np.__version__, "flwr": flwr.__version__, "platform": platform.platform(),
                "cpu": cpu or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}


def system_report(spec: RunSpec, grid: SimulationGrid) -> dict:
    """Resource class of every client and which clients failed or straggled, and how often."""
    classes = SystemModel.of_run(spec).assignment
    return {
        "class_counts": dict(Counter(classes)),
        "failed_rounds": sum(grid.failed.values()),
        "straggler_rounds": sum(grid.straggled.values()),
        "failed": {str(c): n for c, n in sorted(grid.failed.items()) if n},
        "stragglers": {str(c): n for c, n in sorted(grid.straggled.items())},
        "failed_by_class": _sum_by(classes, grid.failed),
        "stragglers_by_class": _sum_by(classes, grid.straggled),
        "last_failure_reason": {str(c): r for c, r in sorted(grid.last_failure.items())},
    }


def _sum_by(classes: list[str], counts: Counter) -> dict[str, int]:
    out: Counter[str] = Counter()
    for client, n in counts.items():
        out[classes[client]] += n
    return dict(out)


def fairness_report(spec: RunSpec, clients: list[dict]) -> dict:
    """Per-group metrics (``groups_file``), whether a group-loss bound holds (strategies with
    ``max_group_loss``), and which clients the global model serves (algorithms reporting ``served``)."""
    out: dict = {}
    if spec.groups_file:
        groups = run_groups(spec)
        out["groups"] = group_summaries(clients, groups, "num_test")
        policy = spec.policy
        bound = spec.strategy.server.get("max_group_loss", policy.get("max_group_loss") if policy else None)
        if bound is not None:  # on the losses of the model the constraint is about (Scafflix: the FLIX models)
            key = ("personalized_loss" if getattr(spec.strategy.client.obj, "objective_is_personalized", False)
                   else "global_loss")
            losses = {g: m[key] for g, m in out["groups"].items()}
            out["group_bound"] = {"max_group_loss": bound, "loss": key, "holds": all(v <= bound for v in losses.values()),
                                  "violated_by": sorted(g for g, v in losses.items() if v > bound)}
    if clients and "served" in clients[0]:
        served = [c["partition_id"] for c in clients if c["served"] >= 0.5]
        out["appeal"] = {
            "served": served,
            "recommend_personalization": [c["partition_id"] for c in clients if c["served"] < 0.5],
            "served_fraction": len(served) / len(clients),
        }
    return out


def clients_here(spec: RunSpec) -> bool:
    """Whether this process's ClientApp serves clients (``simulation.backend=local``, or the driver's
    own node on Ray): the partitions the driver opens (data check, client sizes) then stay in the
    process's data cache (``federated_data``) for them instead of being opened again."""
    return spec.simulation.backend == "local" or driver_runs_node(spec.simulation)


def _count_clients(spec: RunSpec, data_file: Path | None = None) -> int:
    """Open the data (the check), writing the clients file to ``data_file`` if given; without one,
    into the process's data cache where this process's ClientApp will use it (``clients_here``)."""
    from threadpoolctl import threadpool_limits

    from octomil_sim.data import write_clients_file

    with threadpool_limits(limits=1):
        if data_file is not None:
            return write_clients_file(spec, data_file)
        return (federated_data(spec) if clients_here(spec) else FederatedData(spec)).num_clients


def check_data_while_ray_starts(spec: RunSpec, backend_config: dict, client_app=None,
                                data_file: Path | None = None, spare: int = 0) -> list:
    """Fail fast (missing dataset, impossible partition) before any client runs. The check opens the
    data in a thread of this process (HF ``datasets`` is imported there when the data is opened, not
    when an earlier run's clients file is found; partitions are memory-mapped Arrow and are dropped once
    counted) while Ray starts through Flower's own backend
    code (which then finds it running), so the two start-up costs overlap. With ``client_app``, the
    client actors start as soon as Ray is up and prepare it beside the check (``early_client_actors``);
    they are returned for ``lean_client_actors`` (``spare`` fewer than Ray's CPUs hold: the driver's
    own node, ``simulation.driver_node``). With ``data_file`` (``data.clients_file``), the
    check writes the actors' clients file there. A failed check stops Ray again. Call ``cache_source``
    first.

    The check runs with BLAS limited to one thread: OpenBLAS shuts its thread pool down in a fork
    handler, and ``ray.init`` forks (its ``Popen`` calls pass a ``preexec_fn``) while this thread
    computes. That is what held runs for 5 to 9.5 minutes with no client actor started: the Ray logs
    of three such runs (2026-11-25, 16:51-17:02) show Ray up and the GCS with no actor ever requested,
    i.e. the driver never left this function; the thread was generating Synthetic data
    (``multivariate_normal``'s SVD), which ``cache_source`` now does before Ray starts."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from octomil_sim.data import may_download
    from octomil_sim.local_ray import early_client_actors, lean_head_node

    with ThreadPoolExecutor(max_workers=1) as pool:
        checked = pool.submit(_count_clients, spec, data_file)
        try:
            with lean_head_node():
                backend = RayBackend(backend_config)
            # a dataset the check may download: the actors start after it, once it is in the local cache
            early = [] if client_app is None or may_download(spec) else early_client_actors(backend, client_app, spare)
            checked.result()
        except BaseException:
            ray.shutdown()
            raise
    return early


def check_data(spec: RunSpec, data_file: Path | None = None) -> None:
    """``check_data_while_ray_starts`` without Ray (``simulation.backend=local``). With ``data_file``
    (``data.clients_file``: a generated dataset), the check writes the clients file there unless an
    earlier run with the same data did, and this process's ClientApp maps it: a later run opens no
    partition (at 10,000 clients, 1.6 s to every client's tensors against 24 s from the partitions).
    Without one (a hub dataset), the partitions are opened once, into the process's data cache
    (``federated_data``) that the ClientApp then uses; ``in_process_clients`` empties it at the end.
    Call ``cache_source`` first."""
    _count_clients(spec, data_file)


def _runtime_environment() -> None:
    """Quiet logs and a lean Ray, set before Flower and Ray are imported."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")  # flwr-datasets' per-actor partitioning bars
    # Ray prestarts one idle task worker per CPU; Flower's actors start their own worker processes,
    # so those would only compete for the cores while Ray, the data check and the actors start
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # HF datasets is imported on first use (``data.hf_datasets``), after this, and its import resets its
    # logger to this variable's level (default: warning)
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in ("flwr", "alembic", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(spec: RunSpec, output_dir: str | Path) -> dict:
    """Run the experiment ``spec`` (or resume it from ``output_dir``'s checkpoint); returns the
    results dict also written to ``results.json``. The front ends build ``spec`` with
    ``RunSpec.from_config``."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"run() takes a RunSpec (RunSpec.from_config(cfg)), not {type(spec).__name__}")
    spec.check()  # its record (results.json, the checkpoint's identity) says what it runs
    _runtime_environment()  # first: validate builds the strategy, whose warnings it quiets
    validate(spec)
    output_dir = Path(output_dir)
    if spec.simulation.state_dir is None:
        spec = spec.replace(simulation={"state_dir": str(output_dir.resolve() / "client_state")})
    output_dir.mkdir(parents=True, exist_ok=True)
    with stop_on_signals() as stop:
        return _run(spec, output_dir, stop)


def ray_init_args(s: SimulationSpec) -> dict:
    """``ray.init`` arguments: a private local instance (``address="local"``: never one that someone
    started on this machine, which ``ray.init()`` would join) sized by ``ray_num_cpus``, or the cluster
    at ``ray_address`` (``auto``: the one this machine belongs to), whose nodes set their own CPUs."""
    args = {"include_dashboard": False, "logging_level": logging.ERROR}
    if s.ray_address is None:
        args["address"] = "local"
        if s.ray_num_cpus is not None:
            args["num_cpus"] = s.ray_num_cpus
    else:
        args["address"] = s.ray_address
    return args


def client_actors_started() -> int | None:
    """How many of this job's Flower client actors Ray runs (state ALIVE); None when Ray cannot say."""
    try:
        import ray

        job = ray.get_runtime_context().get_job_id()
        return sum(1 for a in ray._private.state.actors().values()
                   if a.get("State") == "ALIVE" and a.get("ActorClassName", "").endswith("ClientAppActor")
                   and a.get("JobID") == job)
    except Exception:  # a private Ray API: never let the check itself stop a run
        return None


def ray_report(s: SimulationSpec) -> str:
    """One line saying which Ray the run uses (after Ray started)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if s.ray_address is None:
        return f"Ray: a private local instance ({cpus} CPUs)"
    return f"Ray: joined the cluster at {s.ray_address} ({nodes} nodes, {cpus} CPUs)"


def _run(spec: RunSpec, output_dir: Path, stop: StopRequest) -> dict:
    from flwr.simulation import run_simulation  # after _runtime_environment's settings

    from octomil_sim.arrays import fast_array_reads
    from octomil_sim.local_backend import in_process_clients, local_run_active
    from octomil_sim.local_ray import driver_node_backend, lean_client_actors
    from octomil_sim.polling import prompt_simulation_runtime

    started = time.perf_counter()
    saved = resume_point(spec, output_dir)
    if (finished := finished_results(saved, spec, output_dir)) is not None:
        return finished
    if saved is not None:
        started -= saved["wall_time_s"]  # wall_time_s also counts the interrupted run, up to its checkpoint
    s = spec.simulation
    nodes, fresh = num_nodes(spec, None if saved is None else saved_num_nodes(saved)), num_nodes(spec)
    if nodes != fresh:
        log.info("resumed with the checkpoint's %d Flower nodes (here a new run would have %d): the same clients "
                 "share a message as before, so the numbers are the uninterrupted run's", nodes, fresh)
    server_app = build_server_app(
        make_strategy=lambda: build_strategy(spec),
        session=lambda: session, num_rounds=s.rounds, num_clients=s.num_clients, num_nodes=nodes,
        deadline=SystemModel.of_run(spec).deadline, should_stop=stop.is_set,
        actors_started=client_actors_started if s.backend == "ray" else lambda: None,
        startup_timeout=s.startup_timeout_s, unseen=unseen_clients(spec), driver_node=driver_runs_node(s),
    )
    cache_source(spec)  # a generated dataset's first generation runs here, before Ray forks (see its docstring)
    data_file = clients_file(spec)  # the clients' tensors, written by the data check (octomil_sim.client_data)
    client_app = build_client_app(spec, None if data_file is None else str(data_file))
    backend_config = {
        "client_resources": {"num_cpus": s.num_cpus_per_client, "num_gpus": s.num_gpus_per_client},
        "init_args": ray_init_args(s),
    }
    on_ray = s.backend == "ray"
    driver_node = int(driver_runs_node(s))  # the driver serves one node, in place of one actor (local_ray.driver_node_backend)
    if on_ray and local_run_active():
        raise RuntimeError("a run with simulation.backend=local is running in this process; a Ray run started "
                           "beside it would run its clients here: run them one after the other")
    reaper = Reaper() if on_ray and s.ray_address is None else None  # a killed driver leaves no Ray process behind
    if not on_ray:
        here = in_process_clients()  # (one such run per process, from here; also with the driver's node)
    else:
        here = in_process_clients(driver_node_backend(backend_config)) if driver_node else nullcontext()
    try:
        with here:
            early = []
            if on_ray:
                early = check_data_while_ray_starts(spec, backend_config, client_app, data_file, driver_node)
                said = ray_report(s) + ("; the driver runs one node's clients itself (simulation.driver_node)"
                                        if driver_node else "")
            else:
                check_data(spec, data_file)
                said = "Clients run in this process (simulation.backend=local)"
            stop.rearm()
            log.info(said)
            session = RunSession(spec, output_dir, saved, started, nodes)
            if not stop.is_set():
                with session.progress, prompt_simulation_runtime(), fast_array_reads(), \
                        lean_client_actors(early, driver_node) if on_ray else nullcontext():
                    # the name only gates Flower's "is Ray installed" exit: a local run needs no Ray
                    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                                   backend_config=backend_config, backend_name="ray" if on_ray else "local")
    finally:
        if reaper is not None:
            reaper.done()
    if stop.is_set() and session.results is None:  # a signal during the last round or the final evaluation: done anyway
        if on_ray:
            import ray

            ray.shutdown()  # Flower's engine shuts Ray down after a run; a signal before it started skips that
        session.end_logging({})  # what was logged so far stays (W&B: the run ends as finished early)
        last = session.stopped_after if session.stopped_after is not None else (saved["round"] if saved else 0)
        checkpointed = bool(s.checkpoint_every) and session.checkpointed == last and last > 0
        raise Interrupted(stop.signum, last, output_dir, checkpointed)
    if session.error is not None:
        session.end_logging({})
        raise session.error
    results = session.results
    if results is None:
        raise RuntimeError("the ServerApp ended without results; see the Flower log above")
    try:
        results["wall_time_s"] = time.perf_counter() - started
        (output_dir / "results.json").write_text(json.dumps(results, indent=1))
        from octomil_sim.plots import plot_run  # matplotlib: 25-30 MB, only once the run is over and Ray is gone

        plot_run(results, output_dir / "results.png")
        session.end_logging(results["final"])
    finally:
        session.end_logging({})  # on any error too (a no-op once finished)
    return results
