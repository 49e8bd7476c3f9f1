"""Benchmark (not a test): the small-cohort and start-up workloads of ``bench_scale.py`` timed several
times, the plain loop and the two paths of one backend (the local backend; ``--backend ray``: Ray)
interleaved (plain, by client, vectorized, plain, ...), so that a slow spell of this shared machine
falls on every side alike. Each repetition's ratio is taken against the plain loop of the same
repetition; the table gives the median ratio and the range, and the median wall times. Wall time only (memory: ``bench_scale.py``).

    python experiments/bench_repeat.py --repeat 3
    python experiments/bench_repeat.py --workloads mlr-synthetic11-eval --repeat 6 --block bench_repeat_eval
    python experiments/bench_repeat.py --workloads mlr-synthetic11 --backend ray --block bench_repeat_ray
    python experiments/bench_repeat.py --backend ray-nodes --block bench_driver_node

``--backend ray-nodes``: Ray, vectorized (the default path), with an actor per node
(``simulation.driver_node=false``) against the driver serving one node itself (the default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_scale import COMMON, RESULTS, WORKLOADS
from common import HERE, write_block

#: the sides (name, config overrides; None: the plain loop) of each ``--backend``, the plain loop first
SIDES = {backend: [("plain", None),
                   (f"{name}, client by client", [f"simulation.backend={backend}", "simulation.vectorize=false"]),
                   (f"{name}, vectorized", [f"simulation.backend={backend}", "simulation.vectorize=true"])]
         for backend, name in (("local", "local"), ("ray", "Ray"))}
SIDES["ray-nodes"] = [("plain", None),
                      ("Ray, an actor per node (driver_node=false)", ["simulation.backend=ray", "simulation.driver_node=false"]),
                      ("Ray, the driver's own node (the default)", ["simulation.backend=ray", "simulation.driver_node=true"])]


def wall(cmd: list[str], out: Path) -> float:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="+", default=["mlr-synthetic11", "mlr-synthetic11-eval", "cnn-mnist5k"],
                        choices=sorted(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block", default="bench_repeat",
                        help="README block to write; its numbers go to results/bench_scale/<workload>/repeat.json "
                             "(another block: <block>.json)")
    parser.add_argument("--backend", choices=sorted(SIDES), default="local", help="the framework's backend")
    args = parser.parse_args()
    sides = SIDES[args.backend]
    rows = ["| workload | repetitions | plain loop, median (s) | "
            + " | ".join(f"{s}: median s, ratio median (range)" for s, _ in sides[1:]) + " |",
            "|" + "---|" * (3 + len(sides) - 1)]
    for name in args.workloads:
        ov = [*COMMON, *WORKLOADS[name]]
        subprocess.run([sys.executable, str(HERE / "bench_scale.py"), "--warm", *ov], check=True)
        times: dict[str, list[float]] = {s: [] for s, _ in sides}
        out = RESULTS / name / "repeat"  # each run's folder, emptied before it
        for rep in range(args.repeat):
            for side, overrides in sides:
                if overrides is None:
                    cmd = [sys.executable, str(HERE / "bench_scale.py"), "--plain", str(out), *ov]
                else:
                    cmd = [sys.executable, "-m", "octomil_sim", *ov, *overrides, f"hydra.run.dir={out}", "progress=false"]
                times[side].append(wall(cmd, out))
                print(name, rep, side, f"{times[side][-1]:.1f}s", flush=True)
        subprocess.run(["rm", "-rf", str(out)], check=True)  # the times are kept below
        plain = times["plain"]
        cells = []
        for side, _ in sides[1:]:
            ratios = [t / p for t, p in zip(times[side], plain)]
            cells.append(f"{statistics.median(times[side]):.1f}, {statistics.median(ratios):.2f}x "
                         f"({min(ratios):.2f}-{max(ratios):.2f})")
        rows.append(f"| {name} | {args.repeat} | {statistics.median(plain):.1f} | " + " | ".join(cells) + " |")
        kept = "repeat.json" if args.block == "bench_repeat" else f"{args.block}.json"
        (RESULTS / name / kept).write_text(json.dumps(times))
    write_block(args.block, rows)


if __name__ == "__main__":
    main()
