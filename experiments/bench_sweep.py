"""Benchmark (not a test): one ``-m`` sweep of four jobs, run one after the other (Hydra's basic
launcher; each job's private Ray instance uses every CPU) against two at a time (Hydra's joblib
launcher, ``octomil-sim train --jobs 2``; each job gets half of the CPUs, ``simulation.ray_num_cpus``,
or, where half is one client process, runs on the local backend, and keeps the Flower nodes it has
alone, ``simulation.num_nodes``). Both sweeps run back to back in
this script on the same machine; the table says whether every job ended with the same numbers in both.

    python experiments/bench_sweep.py
    python experiments/bench_sweep.py --rounds 300 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from common import HERE, write_block

RESULTS = HERE / "results" / "bench_sweep"


def sweep(name: str, seeds: list[int], rounds: int, extra: list[str]) -> tuple[float, dict]:
    out = RESULTS / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "octomil_sim", "-m", f"simulation.seed={','.join(map(str, seeds))}",
           "strategy=fedavg", f"simulation.rounds={rounds}", "simulation.checkpoint_every=0", "progress=false",
           f"hydra.sweep.dir={out}", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    finals = {}
    for path in out.glob("*/results.json"):
        results = json.loads(path.read_text())
        finals[results["config"]["simulation"]["seed"]] = results["final"]["global_acc"]
    return wall, finals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    one, finals_one = sweep("one_at_a_time", args.seeds, args.rounds, [])
    two, finals_two = sweep("two_at_a_time", args.seeds, args.rounds,
                            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    same = finals_two == finals_one
    print(f"one at a time {one:.1f}s, two at a time {two:.1f}s; same numbers: {same}")
    write_block("bench_sweep", [
        "| sweep | jobs | rounds each | one at a time, all CPUs each (s) | two at a time, half the CPUs each (s) "
        "| speed-up | same numbers as the jobs one at a time |",
        "|---|---|---|---|---|---|---|",
        f"| FedAvg, Synthetic(0.5, 0.5), 100 clients, 10 a round, seeds {','.join(map(str, args.seeds))} "
        f"| {len(args.seeds)} | {args.rounds} | {one:.1f} | {two:.1f} | {one / two:.2f}x | {'yes' if same else 'NO'} |",
    ])


if __name__ == "__main__":
    main()
