"""Runs one configured experiment through Flower's simulation engine and writes its results.

``run(cfg, output_dir)`` checks the config, loads the data once (so a missing dataset fails before
Ray starts), builds the ServerApp and ClientApp, runs them on the Ray backend and writes
``results.json`` and ``results.png`` into ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from octomil_sim.client_app import build_client_app, build_model
from octomil_sim.config import validate
from octomil_sim.data import FederatedData
from octomil_sim.loggers import make_logger
from octomil_sim.metrics import (
    evaluate_aggregation,
    group_summaries,
    load_groups,
    summarize_clients,
    train_aggregation,
)
from octomil_sim.plots import plot_run
from octomil_sim.server_app import build_server_app


def driver_rss_mb() -> float:
    """Resident memory of this (the driver) process in MB: the ServerApp's side of the run."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):  # not Linux: peak instead of current
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def strategy_kwargs(cfg: DictConfig) -> dict:
    """Sampling and metric-aggregation arguments every Flower strategy of the framework takes."""
    s = cfg.simulation
    n_eval = max(1, round(s.fraction_evaluate * s.num_clients)) if s.fraction_evaluate > 0 else 0
    return {
        "seed": s.seed,
        "fraction_train": s.clients_per_round / s.num_clients,
        "min_train_nodes": s.clients_per_round,
        "fraction_evaluate": s.fraction_evaluate,
        "min_evaluate_nodes": n_eval,
        "min_available_nodes": s.num_clients,
        "train_metrics_aggr_fn": train_aggregation,
        "evaluate_metrics_aggr_fn": evaluate_aggregation,
    }


def initial_arrays(cfg: DictConfig) -> ArrayRecord:
    torch.manual_seed(cfg.simulation.seed)
    return ArrayRecord(build_model(cfg).state_dict())


class RunRecorder:
    """Collects per-round and per-client numbers into the ``results.json`` structure."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.round_info: dict[int, dict] = {}
        self.results: dict | None = None
        self._last = time.perf_counter()
        self._bytes: dict[str, int] = {}
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), disable=not cfg.get("progress", True),
        )
        self.task = self.progress.add_task(
            f"{cfg.strategy.name} on {cfg.dataset.name}: rounds", total=cfg.simulation.rounds
        )

    def on_round(self, server_round: int, arrays: ArrayRecord, bytes_so_far: dict[str, int]) -> None:
        now = time.perf_counter()
        if server_round > 0:
            self.round_info[server_round] = {
                "bytes_up": bytes_so_far.get("train_up", 0) - self._bytes.get("train_up", 0),
                "bytes_down": bytes_so_far.get("train_down", 0) - self._bytes.get("train_down", 0),
                "time_s": now - self._last,
                "driver_rss_mb": driver_rss_mb(),
            }
            self.progress.advance(self.task)
        self._bytes, self._last = bytes_so_far, now

    def on_done(self, result, rows: list[dict], total_bytes: dict[str, int], seconds: float) -> None:
        rounds = []
        for r in range(1, self.cfg.simulation.rounds + 1):
            row = {"round": r, **dict(result.train_metrics_clientapp.get(r, {}))}
            row.update(dict(result.evaluate_metrics_clientapp.get(r, {})))
            row.update(self.round_info.get(r, {}))
            rounds.append(row)
        clients = sorted(
            ({"partition_id": int(c.pop("partition-id")), "num_test": int(c.pop("num-examples")), **c}
             for c in rows),
            key=lambda c: c["partition_id"],
        )
        final = summarize_clients(clients, weight_key="num_test")
        final.update({
            "bytes_up": total_bytes.get("train_up", 0),
            "bytes_down": total_bytes.get("train_down", 0),
            "bytes_evaluate_down": total_bytes.get("evaluate_down", 0),
            "driver_rss_mb": driver_rss_mb(),
        })
        self.results = {
            "name": f"{self.cfg.strategy.name} on {self.cfg.dataset.name}",
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "rounds": rounds,
            "clients": clients,
            "final": final,
            **fairness_report(self.cfg, clients),
            "wall_time_s": seconds,
        }


def fairness_report(cfg: DictConfig, clients: list[dict]) -> dict:
    """Per-group metrics (``groups_file``), whether a group-loss bound holds (strategies with
    ``max_group_loss``), and which clients the global model serves (algorithms reporting ``served``)."""
    out: dict = {}
    if cfg.get("groups_file"):
        groups = load_groups(cfg.groups_file, cfg.simulation.num_clients)
        out["groups"] = group_summaries(clients, groups, "num_test")
        bound = cfg.strategy.server.get("max_group_loss")
        if bound is not None:
            losses = {g: m["global_loss"] for g, m in out["groups"].items()}
            out["group_bound"] = {"max_group_loss": bound, "holds": all(v <= bound for v in losses.values()),
                                  "violated_by": sorted(g for g, v in losses.items() if v > bound)}
    if clients and "served" in clients[0]:
        served = [c["partition_id"] for c in clients if c["served"] >= 0.5]
        out["appeal"] = {
            "served": served,
            "recommend_personalization": [c["partition_id"] for c in clients if c["served"] < 0.5],
            "served_fraction": len(served) / len(clients),
        }
    return out


def _count_clients(cfg_yaml: str) -> int:
    return FederatedData(OmegaConf.create(cfg_yaml)).num_clients


def check_data(cfg: DictConfig) -> None:
    """Fail fast (missing dataset, impossible partition) before Ray starts, in a child process:
    the driver, like a real federation's server, never holds the clients' data."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        pool.submit(_count_clients, OmegaConf.to_yaml(cfg, resolve=True)).result()


def _quiet_logs() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for name in ("flwr", "alembic", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Run the experiment ``cfg``; returns the results dict also written to ``results.json``."""
    validate(cfg)
    _quiet_logs()
    output_dir = Path(output_dir)
    if cfg.simulation.state_dir is None:
        cfg = OmegaConf.merge(cfg, {"simulation": {"state_dir": str(output_dir.resolve() / "client_state")}})
    from flwr.simulation import run_simulation  # after the env settings above

    output_dir.mkdir(parents=True, exist_ok=True)
    check_data(cfg)
    s = cfg.simulation
    recorder = RunRecorder(cfg)
    server_app = build_server_app(
        make_strategy=lambda: instantiate(cfg.strategy.server, **strategy_kwargs(cfg)),
        initial_arrays=lambda: initial_arrays(cfg),
        num_rounds=s.rounds,
        num_nodes=s.num_clients,
        on_round=recorder.on_round,
        on_done=recorder.on_done,
    )
    client_app = build_client_app(OmegaConf.to_yaml(cfg, resolve=True))
    init_args = {"include_dashboard": False, "logging_level": logging.ERROR}
    if s.ray_num_cpus is not None:
        init_args["num_cpus"] = s.ray_num_cpus
    backend_config = {
        "client_resources": {"num_cpus": s.num_cpus_per_client, "num_gpus": s.num_gpus_per_client},
        "init_args": init_args,
    }
    with recorder.progress:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=s.num_clients,
                       backend_config=backend_config)
    results = recorder.results
    if results is None:
        raise RuntimeError("the ServerApp ended without results; see the Flower log above")
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot_run(results, output_dir / "results.png")
    logger = make_logger(cfg, output_dir)
    for row in results["rounds"]:
        logger.log_round(row)
    logger.finish(results["final"])
    return results
