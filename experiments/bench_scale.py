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

    python experiments/bench_scale.py                      # 1,000 and 10,000 clients
    python experiments/bench_scale.py --clients 1000 --rounds 5
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

from common import HERE, write_block

RESULTS = HERE / "results" / "bench_scale"
SETTING = ["strategy=fedavg", "model=mlp", "dataset.source.max_samples=100", "simulation.fraction_evaluate=0"]


def overrides(clients: int, per_round: int, rounds: int) -> list[str]:
    return [*SETTING, f"simulation.num_clients={clients}", f"simulation.clients_per_round={per_round}",
            f"simulation.rounds={rounds}"]


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


def measure(cmd: list[str], out: Path) -> tuple[float, float]:
    """Run ``cmd`` twice; return (wall seconds of a run left alone, peak PSS of its process tree in MB
    sampled during a second run). Reading smaps of a dozen large processes every 0.1 s takes a
    noticeable share of 2 cores, more for the Flower tree than for the single plain process, so
    time and memory come from separate runs, each into an emptied ``out`` (no resume)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent).returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; run it by hand to see why")
    wall = time.perf_counter() - start
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

    with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
        cfg = RunSpec.from_config(compose("config", overrides=[*args, "simulation.state_store=memory"]))

    started = time.perf_counter()
    rt = client_runtime(cfg)
    s = cfg.simulation
    round_times = []
    weights = {k: v.numpy() for k, v in initial_arrays(cfg).to_torch_state_dict().items()}
    model = build_model(cfg)
    for server_round in range(1, s.rounds + 1):
        round_start = time.perf_counter()
        random.seed(s.seed * 1_000_003 + 2 * server_round)  # as SeededSampling around Flower's sampling
        sampled = sorted(random.sample(list(range(s.num_clients)), s.clients_per_round))
        uploads, sizes = [], []
        for client in sampled:
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
            task = rt.task(RecordDict({"config": ConfigRecord({"server-round": server_round})}), client, salt=0)
            upload, _ = rt.algorithm.train(model, task)
            uploads.append({k: v.detach().numpy().copy() for k, v in upload.items()})
            sizes.append(float(task.data.num_train))
        total = sum(sizes)
        average: dict[str, np.ndarray] = {}
        for upload, n in zip(uploads, sizes):  # Flower's aggregate_arrayrecords, same order, same dtype
            for k, v in upload.items():
                average[k] = v * (n / total) if k not in average else average[k] + v * (n / total)
        weights = average
        round_times.append(time.perf_counter() - round_start)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    accs = [evaluate(model, rt.data.client(c).x_test, rt.data.client(c).y_test)[1] for c in range(s.num_clients)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.pkl").write_bytes(pickle.dumps(weights))
    (out / "result.json").write_text(json.dumps({"mean_acc": float(np.mean(accs)), "round_s": round_times,
                                                 "total_s": time.perf_counter() - started}))


def warm_cache(args: list[str]) -> None:
    from hydra import compose, initialize_config_module

    from octomil_sim.data import FederatedData
    from octomil_sim.spec import RunSpec

    with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
        FederatedData(RunSpec.from_config(compose("config", overrides=args)))


def flower_final_weights(run_dir: Path) -> dict:
    from octomil_sim.checkpoint import load_checkpoint

    _, state = load_checkpoint(run_dir)
    return {k: v.numpy() for k, v in state["arrays"].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--plain", nargs=argparse.REMAINDER)
    parser.add_argument("--warm", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.plain:
        return plain_loop(Path(args.plain[0]), args.plain[1:])
    if args.warm:
        return warm_cache(args.warm)

    import numpy as np

    rows = ["| clients | clients per round | rounds | whole run: Flower + Ray (s) | plain loop (s) | ratio "
            "| rounds 2 to last: Flower (s) | plain (s) | ratio | peak PSS Flower tree (MB) | peak PSS plain (MB) "
            "| same final model |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.clients:
        ov = overrides(n, args.per_round, args.rounds)
        flower_dir, plain_dir = RESULTS / f"clients{n}" / "flower", RESULTS / f"clients{n}" / "plain"
        # the run's last round is checkpointed for the comparison of final models (nothing else is)
        flower_cmd = [sys.executable, "-m", "octomil_sim", *ov, f"simulation.checkpoint_every={args.rounds}",
                      f"hydra.run.dir={flower_dir}", "progress=false"]
        plain_cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(plain_dir), *ov]
        # generate the dataset into the cache first: both sides then read the same memory-mapped files
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--warm", *ov], check=True)
        t_flower, m_flower = measure(flower_cmd, flower_dir)
        t_plain, m_plain = measure(plain_cmd, plain_dir)
        a, b = flower_final_weights(flower_dir), pickle.loads((plain_dir / "weights.pkl").read_bytes())
        same = all(np.array_equal(a[k], b[k]) for k in a)
        # round 1 of the Flower run also holds Ray's and the actors' start-up: compare the rounds after it
        f_rounds = sum(r["time_s"] for r in json.loads((flower_dir / "results.json").read_text())["rounds"][1:])
        p_rounds = sum(json.loads((plain_dir / "result.json").read_text())["round_s"][1:])
        print(f"{n} clients: flower {t_flower:.1f}s {m_flower:.0f}MB, plain {t_plain:.1f}s {m_plain:.0f}MB, "
              f"ratio {t_flower / t_plain:.2f}, same model {same}", flush=True)
        rows.append(f"| {n} | {args.per_round} | {args.rounds} | {t_flower:.1f} | {t_plain:.1f} | "
                    f"{t_flower / t_plain:.2f}x | {f_rounds:.1f} | {p_rounds:.1f} | {f_rounds / p_rounds:.2f}x | {m_flower:.0f} | {m_plain:.0f} | {'yes' if same else 'NO'} |")
    write_block("bench_scale", rows)


if __name__ == "__main__":
    main()
