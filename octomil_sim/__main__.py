"""``python -m octomil_sim [group=choice ...] [key=value ...]``: one run, or a sweep with ``-m``."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from octomil_sim.config import check_added_keys, check_group_choices, check_output_paths
from octomil_sim.errors import ConfigError, RunError
from octomil_sim.interrupt import Interrupted


def job_dirname(overrides: str, limit: int = 150) -> str:
    """A ``-m`` job's folder name from its overrides (Hydra's ``override_dirname``, ``key=value`` joined
    by commas): path separators replaced; when longer than ``limit``, each key shortened to its last
    part (``simulation.seed=1`` -> ``seed=1``), and if still longer, cut with a short hash of the whole.
    ``octomil-sim report`` reads a job's overrides from its ``.hydra/overrides.yaml``, not its name."""
    import hashlib

    name = overrides.replace(os.sep, "_") or "defaults"
    if len(name) > limit:
        name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" if sep else k
                        for k, sep, v in (item.partition("=") for item in name.split(",")))
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha256(overrides.encode()).hexdigest()[:8]}"
    return name


if not OmegaConf.has_resolver("octomil_sim.dirname"):
    OmegaConf.register_new_resolver("octomil_sim.dirname", job_dirname)


@hydra.main(config_path="pkg://octomil_sim.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from octomil_sim.checkpoint import checkpoint_folders
    from octomil_sim.runner import run
    from octomil_sim.spec import RunSpec

    try:
        check_added_keys(cfg, list(HydraConfig.get().overrides.task))
        check_output_paths(HydraConfig.get().runtime.output_dir)
        output_dir, jobs = HydraConfig.get().runtime.output_dir, parallel_jobs()
        resuming = jobs > 1 and bool(checkpoint_folders(output_dir))  # (only a job side by side asks)
        results = run(share_cpus(RunSpec.from_config(cfg), jobs, resuming=resuming), output_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as err:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        print(err.message(HydraConfig.get().sweep.dir if multirun else None), file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(err.exit_code)  # Ray and the run are shut down; skip waiting on the interpreter's teardown
    final = results["final"]
    print(
        f"{results['name']}: global_acc {final['global_acc']:.4f} "
        f"(bottom-10% {final['global_acc_bottom10']:.4f}), personalized_acc "
        f"{final['personalized_acc']:.4f} (bottom-10% {final['personalized_acc_bottom10']:.4f}); "
        f"results in {HydraConfig.get().runtime.output_dir}/results.json"
    )
    return final["personalized_acc"]


def parallel_jobs() -> int:
    """How many jobs of this sweep run side by side: ``hydra.launcher.n_jobs`` under Hydra's joblib
    launcher (``hydra/launcher=joblib``, ``octomil-sim train --jobs``), else 1."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or "joblib" not in str(hc.launcher.get("_target_", "")).lower():
        return 1
    return int(hc.launcher.get("n_jobs") or 1)


def share_cpus(spec, jobs: int, resuming: bool = False):
    """With ``jobs`` runs side by side on this machine, each run's private Ray instance gets its share
    of the CPUs (``simulation.ray_num_cpus``), so that the jobs' client actors never outnumber the
    cores; a run that joins a cluster (``ray_address``), whose scheduler shares the cluster's CPUs
    among the jobs' actors, or that sets ``ray_num_cpus`` itself, is left as it is. A job keeps the
    Flower nodes it would have alone (``simulation.num_nodes``, unless set: ``config.num_nodes``), so
    its clients share messages as they would alone and its numbers are the run's alone, also with
    cohort-vectorized training, whose float rounding depends on which clients share a message; a job
    ``resuming`` a checkpoint keeps that checkpoint's count instead (``runner.resume_point``). A CPU
    job whose share is one client process runs its clients in its own process
    (``simulation.backend=local``, Ray's CPUs left unset): its one Ray actor would run the nodes'
    messages one after the other too, and the local backend gives the same numbers without Ray's
    start and transport."""
    from octomil_sim.config import num_nodes

    s = spec.simulation
    if jobs <= 1 or s.ray_address is not None or s.ray_num_cpus is not None:
        return spec
    share = max(1, (os.cpu_count() or 1) // jobs)
    changes = {} if resuming or s.num_nodes is not None else {"num_nodes": num_nodes(spec)}
    if s.backend == "ray" and not s.num_gpus_per_client and share // s.num_cpus_per_client <= 1:
        return spec.replace(simulation={**changes, "backend": "local"})
    return spec.replace(simulation={**changes, "ray_num_cpus": share})


def check_parallel_jobs(args: list[str]) -> list[str]:
    """Before anything starts: ``hydra/launcher=joblib`` runs at most one job per CPU (each job is a
    Ray instance with at least one client actor); without ``hydra.launcher.n_jobs`` it runs that many
    (joblib's own default is 10)."""
    if not any(a.split("=")[0].lstrip("+") == "hydra/launcher" and a.endswith("=joblib") for a in args):
        return args
    cpus = os.cpu_count() or 1
    given = [a for a in args if a.lstrip("+").startswith("hydra.launcher.n_jobs=")]
    if not given:
        return [*args, f"hydra.launcher.n_jobs={cpus}"]
    value = given[-1].split("=", 1)[1]
    if not value.isdigit() or not 1 <= int(value) <= cpus:
        raise ConfigError(f"hydra.launcher.n_jobs={value}: allowed: 1..{cpus} (the CPUs of this machine; each job "
                          "runs at least one client actor)")
    return args


def cli() -> None:
    """``octomil-sim`` / ``python -m octomil_sim``: ``init``, ``train``, ``report`` and ``compare`` subcommands
    (``octomil_sim.cli``), or Hydra overrides as they are (``python -m octomil_sim strategy=ditto``)."""
    from octomil_sim import cli as commands
    from octomil_sim.config import EXTRA_CONFIG_DIRS

    args = sys.argv[1:]
    try:
        if args and args[0] in ("init", "report", "compare"):
            sys.exit(getattr(commands, args[0])(args[1:]))  # compare's status; None (0) for the others
        if args and args[0] == "train":
            args = commands.train_overrides(args[1:])
            if (Path.cwd() / commands.PROJECT_EXPERIMENT).is_file():
                EXTRA_CONFIG_DIRS.append(Path.cwd() / "conf")
                sys.path.insert(0, str(Path.cwd()))  # the project's model.py, here and (via Flower) in Ray's actors
            sys.argv = [sys.argv[0], *args]
        check_group_choices([a for a in args if not a.startswith("-")])
        args = check_parallel_jobs(args)
        sys.argv = [sys.argv[0], *args]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End the process once the run (or sweep) is written: run the exit handlers (Ray's, logging's,
    wandb's), flush, and skip the interpreter's module-by-module teardown of torch, Ray and datasets,
    which costs about 0.8 s on 2 cores (4% of a 1,000-client benchmark run). Falls back to a normal
    exit while a non-daemon thread still runs, since the interpreter would wait for it."""
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    cli()
