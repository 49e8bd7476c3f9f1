"""Benchmark (not a test): where a Ray-backend run's memory goes, by process. Runs FedAvg on 1,000 clients
(the ``mlp-1000`` workload of ``bench_scale.py``, 15 rounds; ``--workload cnn-mnist5k``: that workload of
``bench_scale.py`` instead) and samples the proportional set size (PSS) of
every process of its tree (driver, Ray's processes, client actors) every 0.3 s; prints the processes at
the moment the tree's total peaked. Extra arguments are config overrides.

    python experiments/ray_memory.py
    python experiments/ray_memory.py simulation.backend=local
    python experiments/ray_memory.py --workload cnn-mnist5k
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench_scale import COMMON, HERE, WORKLOADS, _children, _pss_kb

WORKLOAD = ["strategy=fedavg", "model=mlp", "dataset.source.max_samples=100", "simulation.num_clients=1000",
            "simulation.clients_per_round=100", "simulation.rounds=15", "simulation.fraction_evaluate=0",
            "progress=false"]


def main() -> None:
    out = HERE / "results" / "ray_memory"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    overrides = sys.argv[1:]
    workload = WORKLOAD
    if overrides[:1] == ["--workload"]:
        workload, overrides = [*COMMON, *WORKLOADS[overrides[1]], "progress=false"], overrides[2:]
    cmd = [sys.executable, "-m", "octomil_sim", *workload, f"hydra.run.dir={out}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
    best_total, best = 0.0, {}
    while proc.poll() is None:
        tree, todo, snap = _children(), [proc.pid], {}
        while todo:
            pid = todo.pop()
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            snap[f"{pid} {name.replace(str(HERE.parent), '.')[:80]}"] = _pss_kb(pid) / 1024
            todo.extend(tree.get(pid, []))
        if sum(snap.values()) > best_total:
            best_total, best = sum(snap.values()), snap
        time.sleep(0.3)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"peak PSS of the tree: {best_total:.0f} MB")
    for name, mb in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"{mb:7.0f} MB  {name}")


if __name__ == "__main__":
    main()
