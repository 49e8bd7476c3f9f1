"""Benchmark (not a test): FedAvg on 1,000 and 10,000 clients through Flower + Ray, against a plain
PyTorch loop doing the same updates, in wall time and in peak memory of the whole process tree.

Both sides run as child processes of this script, which samples the memory of each child and all
its descendants (driver, Ray's GCS, raylet and actors) from /proc every 0.1 s: the peak of the summed
proportional set size (PSS, so memory shared between processes counts once).

The plain loop uses the framework's own pieces without Flower: the same data and partitions, the
same client half (``FedAvgClient.train`` with the same per-(round, client) seeds), the same seeded
client sampling and the same float32 weighted average in client order, then evaluates every client
once at the end as the Flower run does. It checks that its final model equals the Flower run's
(read from the run's last checkpoint), so both did the same updates.

Each workload runs five ways: the plain loop, and the framework on each backend (``simulation.backend``:
``ray``, the ClientApp in Ray actors, the default; ``local``, the ClientApp in the driver's process),
client by client (``simulation.vectorize=false``) and with cohort-vectorized local training (the default).
With ``simulation.fraction_evaluate`` > 0 (``mlr-synthetic11-eval``) the plain loop also evaluates the
clients the framework samples for evaluation every round and checks that its per-round accuracy is
the framework's.

    python experiments/bench_scale.py                                  # 1,000 and 10,000 clients
    python experiments/bench_scale.py --workloads mlr-synthetic11 cnn-mnist5k --block bench_overhead
    python experiments/bench_scale.py --workloads mlp-1000 --sides local --gpu --block bench_scale_gpu

``--gpu`` adds the local backend with its clients on a GPU (``simulation.num_gpus_per_client=1``); its final
model then differs from the plain loop's (on the CPU) by float rounding only.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, check_block, write_block

RESULTS = HERE / "results" / "bench_scale"
# the workloads of issue 12 (no per-round evaluation: the plain loop evaluates every client once at the end)
WORKLOADS = {
    "mlp-1000": ["strategy=fedavg", "model=mlp", "dataset.source.max_samples=100", "simulation.num_clients=1000",
                 "simulation.clients_per_round=100", "simulation.rounds=50"],
    "mlp-10000": ["strategy=fedavg", "model=mlp", "dataset.source.max_samples=100", "simulation.num_clients=10000",
                  "simulation.clients_per_round=100", "simulation.rounds=50"],
    "mlr-synthetic11": ["strategy=fedavg", "model=mlr", "dataset.source.alpha=1", "dataset.source.beta=1",
                        "simulation.num_clients=100", "simulation.clients_per_round=10", "simulation.rounds=1000"],
    "mlr-synthetic11-100": ["strategy=fedavg", "model=mlr", "dataset.source.alpha=1", "dataset.source.beta=1",
                            "simulation.num_clients=100", "simulation.clients_per_round=100", "simulation.rounds=200"],
    "mlr-synthetic11-eval": ["strategy=fedavg", "model=mlr", "dataset.source.alpha=1", "dataset.source.beta=1",
                             "simulation.num_clients=100", "simulation.clients_per_round=10",
                             "simulation.rounds=1000", "simulation.fraction_evaluate=0.2"],
    "cnn-mnist5k": ["strategy=fedavg", "dataset=mnist5k", "model=femnist_cnn", "partition=shard",
                    "simulation.num_clients=50", "simulation.clients_per_round=10", "simulation.rounds=5"],
}
COMMON = ["simulation.fraction_evaluate=0"]  # before a workload's own overrides, which may set it
#: the framework's ways of running a workload: (name, simulation.backend, simulation.vectorize)
SIDES = [("Ray, client by client", "ray", "false"), ("Ray, vectorized", "ray", "true"),
         ("local, client by client", "local", "false"), ("local, vectorized", "local", "true")]
#: ``--gpu``: the local backend with its clients on a GPU (``simulation.num_gpus_per_client=1``)
GPU_SIDES = [("local, client by client, GPU", "local", "false"), ("local, vectorized, GPU", "local", "true")]


# --- memory of a process tree, from /proc ----------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo.extend(tree.get(pid, []))
    return total / 1024


def simulation_value(overrides: list[str], key: str) -> str:
    """The value of the first ``simulation.<key>=...`` among a workload's ``overrides``."""
    return next(o for o in overrides if o.startswith(f"simulation.{key}=")).split("=", 1)[1]


def measure(cmd: list[str], out: Path, memory: bool = True) -> tuple[float, float]:
    """Run ``cmd`` twice; return (wall seconds of a run left alone, peak PSS of its process tree in MB
    sampled during a second run). Reading smaps of a dozen large processes every 0.1 s takes a
    noticeable share of 2 cores, more for the Flower tree than for the single plain process, so
    time and memory come from separate runs, each into an emptied ``out`` (no resume)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent).returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; run it by hand to see why")
    wall = time.perf_counter() - start
    if not memory:
        return wall, float("nan")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_pss_mb(proc.pid))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return wall, peak


# --- the plain loop (runs in a child: python bench_scale.py --plain OUT OVERRIDES...) ---------------
def plain_loop(out: Path, args: list[str]) -> None:
    import numpy as np
    import torch
    from flwr.app import ConfigRecord, RecordDict
    from hydra import compose, initialize_config_module

    from octomil_sim.client_app import build_model, client_runtime
    from octomil_sim.runner import initial_arrays
    from octomil_sim.spec import RunSpec
    from octomil_sim.training import evaluate
    from strategies.fedavg import MEASURE_LOSS_BEFORE

    with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
        cfg = RunSpec.from_config(compose("config", overrides=[*args, "simulation.state_store=memory"]))

    started = time.perf_counter()
    rt = client_runtime(cfg)
    s = cfg.simulation
    round_times = []
    weights = {k: v.numpy() for k, v in initial_arrays(cfg).to_torch_state_dict().items()}
    model = build_model(cfg)
    evaluated = []  # per round with simulation.fraction_evaluate: (round, pooled accuracy of the sampled clients)
    for server_round in range(1, s.rounds + 1):
        round_start = time.perf_counter()
        random.seed(s.seed * 1_000_003 + 2 * server_round)  # as SeededSampling around Flower's sampling
        sampled = sorted(random.sample(list(range(s.num_clients)), s.clients_per_round))
        uploads, sizes = [], []
        for client in sampled:
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
            # as the framework's FedAvg server says (no fairness policy): no loss_before pass
            config = ConfigRecord({"server-round": server_round, MEASURE_LOSS_BEFORE: False})
            task = rt.task(RecordDict({"config": config}), client, salt=0)
            upload, _ = rt.algorithm.train(model, task)
            uploads.append({k: v.detach().numpy().copy() for k, v in upload.items()})
            sizes.append(float(task.data.num_train))
        total = sum(sizes)
        average: dict[str, np.ndarray] = {}
        for upload, n in zip(uploads, sizes):  # Flower's aggregate_arrayrecords, same order, same dtype
            for k, v in upload.items():
                average[k] = v * (n / total) if k not in average else average[k] + v * (n / total)
        weights = average
        if s.fraction_evaluate > 0:  # as SeededSampling around Flower's FedAvg.configure_evaluate (min 2 nodes)
            random.seed(s.seed * 1_000_003 + 2 * server_round + 1)
            chosen = random.sample(list(range(s.num_clients)), max(int(s.num_clients * s.fraction_evaluate), 2))
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
            results = [(evaluate(model, rt.data.client(c).x_test, rt.data.client(c).y_test)[1],
                        rt.data.client(c).num_test) for c in chosen]
            evaluated.append(sum(a * n for a, n in results) / sum(n for _, n in results))
        round_times.append(time.perf_counter() - round_start)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    accs = [evaluate(model, rt.data.client(c).x_test, rt.data.client(c).y_test)[1] for c in range(s.num_clients)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.pkl").write_bytes(pickle.dumps(weights))
    (out / "result.json").write_text(json.dumps({"mean_acc": float(np.mean(accs)), "round_s": round_times,
                                                 "round_acc": evaluated,
                                                 "total_s": time.perf_counter() - started}))


def warm_cache(args: list[str]) -> None:
    """The generated dataset into the cache, and the clients file the framework's clients read (Ray
    actors and the local backend; both as a run finds them once an earlier run with the same data wrote
    them; ``ray_start.py`` also times a first run, which writes the clients file)."""
    from hydra import compose, initialize_config_module

    from octomil_sim.data import cache_source, clients_file, write_clients_file
    from octomil_sim.spec import RunSpec

    with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
        spec = RunSpec.from_config(compose("config", overrides=[*args, "simulation.backend=ray"]))
    cache_source(spec)
    path = clients_file(spec)
    if path is not None:
        write_clients_file(spec, path)


def flower_final_weights(run_dir: Path) -> dict:
    from octomil_sim.checkpoint import load_checkpoint

    _, state = load_checkpoint(run_dir)
    return {k: v.numpy() for k, v in state["arrays"].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="+", default=["mlp-1000", "mlp-10000"], choices=sorted(WORKLOADS))
    parser.add_argument("--block", default="bench_scale", help="the experiments/README.md block to write")
    parser.add_argument("--plain", nargs=argparse.REMAINDER)
    parser.add_argument("--warm", nargs=argparse.REMAINDER)
    parser.add_argument("--sides", nargs="+", choices=["ray", "local"], default=["ray", "local"],
                        help="which backends' sides to run (a machine without Ray: local)")
    parser.add_argument("--gpu", action="store_true", help="also the local backend's sides with clients on a GPU")
    parser.add_argument("--no-memory", action="store_true", help="wall time only (one run of each side)")
    args = parser.parse_args()
    if args.plain:
        return plain_loop(Path(args.plain[0]), args.plain[1:])
    if args.warm:
        return warm_cache(args.warm)

    import numpy as np

    check_block(args.block)
    global SIDES
    SIDES = [side for side in SIDES if side[1] in args.sides] + (GPU_SIDES if args.gpu else [])
    heads = " | ".join(f"{side} (s)" for side, _, _ in SIDES)
    names = " / ".join(side for side, _, _ in SIDES)
    memory = "" if args.no_memory else f" | peak PSS (MB): plain / {names}"
    rows = [f"| workload | clients | a round | rounds | plain loop (s) | {heads} | rounds 2 to last (s): plain / "
            f"{names}{memory} | final model vs plain |", "|" + "---|" * (7 + len(SIDES) + (not args.no_memory))]
    for name in args.workloads:
        ov = [*COMMON, *WORKLOADS[name]]
        rounds = int(simulation_value(ov, "rounds"))
        setting = {k: simulation_value(ov, k) for k in ("num_clients", "clients_per_round")}
        plain_dir = RESULTS / name / "plain"
        plain_cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(plain_dir), *ov]
        # generate the dataset into the cache first: every side then reads the same memory-mapped files
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--warm", *ov], check=True)
        t_plain, m_plain = measure(plain_cmd, plain_dir, not args.no_memory)
        plain_result = json.loads((plain_dir / "result.json").read_text())
        plain_weights = pickle.loads((plain_dir / "weights.pkl").read_bytes())
        p_rounds = sum(plain_result["round_s"][1:])
        sides, diffs = [], []
        for side, backend, vectorize in SIDES:
            gpu = side.endswith("GPU")
            run_dir = RESULTS / name / f"{backend}-{'vectorized' if vectorize == 'true' else 'loop'}{'-gpu' * gpu}"
            # the run's last round is checkpointed for the comparison of final models (nothing else is)
            cmd = [sys.executable, "-m", "octomil_sim", *ov, f"simulation.backend={backend}",
                   f"simulation.vectorize={vectorize}", f"simulation.checkpoint_every={rounds}",
                   f"hydra.run.dir={run_dir}", "progress=false", f"simulation.num_gpus_per_client={int(gpu)}"]
            wall, peak = measure(cmd, run_dir, not args.no_memory)
            final = flower_final_weights(run_dir)
            diff = max(float(np.abs(final[k] - plain_weights[k]).max()) for k in final)
            result = json.loads((run_dir / "results.json").read_text())
            # round 1 also holds the start-up (Ray's and the actors'): the rounds after it apart
            later = sum(r["time_s"] for r in result["rounds"][1:])
            text = "equal" if diff == 0 else f"{diff:.1g}"
            if plain_result["round_acc"]:  # the clients evaluated every round and their accuracy, as the plain loop's
                acc = [r["global_acc"] for r in result["rounds"]]
                gap = max(abs(a - b) for a, b in zip(acc, plain_result["round_acc"], strict=True))
                text += f" (per-round acc. {'equal' if gap < 1e-12 else f'max gap {gap:.1g}'})"
            sides.append((wall, peak, later))
            diffs.append(text)
            print(f"{name} {side}: {wall:.1f}s {peak:.0f}MB (plain {t_plain:.1f}s {m_plain:.0f}MB), "
                  f"max |w - w_plain| {diff:.2g}", flush=True)
        rows.append(f"| {name} | {setting['num_clients']} | {setting['clients_per_round']} | {rounds} | {t_plain:.1f} | "
                    + " | ".join(f"{w:.1f} ({w / t_plain:.2f}x)" for w, _, _ in sides)
                    + f" | {p_rounds:.1f} / " + " / ".join(f"{r:.1f}" for _, _, r in sides)
                    + ("" if args.no_memory else f" | {m_plain:.0f} / " + " / ".join(f"{m:.0f}" for _, m, _ in sides))
                    + " | " + " / ".join(diffs) + " |")
    write_block(args.block, rows)


if __name__ == "__main__":
    main()
