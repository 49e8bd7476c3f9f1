"""Benchmark (not a test): where the seconds of a short run go, by py-spy (issue 12, goal 2).

Runs the ``cnn-mnist5k`` workload of ``bench_scale.py`` (FedAvg, LEAF's CNN, MNIST-5k shards, 50 clients,
10 a round, 5 rounds) two ways under ``py-spy record --subprocesses`` (100 samples a second, every
thread): the plain loop and the framework on the local backend. Each sample is put in the first phase
its stack names (below, in order), so the table reads as CPU seconds per phase; the wall time of each
run is measured without py-spy, just before. (On the Ray backend py-spy sampled the driver and Ray's
processes but none of the client actors, so its column would show no training at all; its start-up
is read from ``bench_scale.py``'s round times instead.)

    python experiments/startup_profile.py      # writes the startup_profile block of experiments/README.md
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_scale import WORKLOADS
from common import HERE, write_block

OV = ["simulation.fraction_evaluate=0", *WORKLOADS["cnn-mnist5k"]]
#: (phase, markers): a sample belongs to the first phase one of whose markers its stack contains
PHASES = [
    ("imports", ("_find_and_load",)),
    ("client training", ("ClientRuntime.train", "FedAvgClient.train", "rt.algorithm.train", "sgd_epochs")),
    ("evaluation", ("ClientRuntime.evaluate", "evaluate (")),
    ("data: partitions and tensors", ("FederatedData", "cache_source", "federated_data", "_to_tensors")),
    ("model build", ("build_model", "build_initial_model", "initial_arrays")),
    ("Flower runtime and messages", ("flwr/",)),
    ("results, plot, checkpoint", ("plot_run", "save_checkpoint", "write_text")),
]


def _phase(stack: str) -> str:
    for name, markers in PHASES:
        if any(m in stack for m in markers):
            return name
    return "other"


def profile(cmd: list[str]) -> tuple[float, Counter]:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        subprocess.run(["py-spy", "record", "-r", "100", "--subprocesses", "-f", "raw", "-o", str(raw), "--", *cmd],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
        phases: Counter = Counter()
        for line in raw.read_text().splitlines():
            stack, count = line.rsplit(" ", 1)
            phases[_phase(stack)] += int(count) / 100  # seconds of one core
    return wall, phases


def main() -> None:
    out = Path(tempfile.mkdtemp())
    runs = {
        "plain loop": [sys.executable, str(HERE / "bench_scale.py"), "--plain", str(out / "plain"), *OV],
        "local backend": [sys.executable, "-m", "octomil_sim", *OV, "simulation.backend=local",
                          "simulation.checkpoint_every=0", f"hydra.run.dir={out / 'local'}", "progress=false"],
    }
    subprocess.run([sys.executable, str(HERE / "bench_scale.py"), "--warm", *OV], check=True)
    results = {}
    for name, cmd in runs.items():
        for d in ("plain", "ray", "local"):
            subprocess.run(["rm", "-rf", str(out / d)], check=True)
        results[name] = profile(cmd)
        print(name, f"{results[name][0]:.1f}s", dict(results[name][1]), flush=True)
    names = [p for p, _ in PHASES] + ["other"]
    rows = ["| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs),
            "| wall time (s, without py-spy) | " + " | ".join(f"{results[r][0]:.1f}" for r in runs) + " |"]
    for p in names:
        rows.append(f"| {p} (CPU s) | " + " | ".join(f"{results[r][1].get(p, 0.0):.1f}" for r in runs) + " |")
    rows.append("| all (CPU s) | " + " | ".join(f"{sum(results[r][1].values()):.1f}" for r in runs) + " |")
    write_block("startup_profile", rows)


if __name__ == "__main__":
    main()
