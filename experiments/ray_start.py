"""Benchmark (not a test): what the lean Ray start saves (``octomil_sim.local_ray``).

Runs workloads of ``bench_scale.py`` on the Ray backend (default path: vectorized) three ways, interleaved
repetition by repetition, each next to the plain loop of the same repetition:
- ``lean``: the runner as it is: a head node without the API server (``lean_head_node``); client
  actors that do not import ``flwr.simulation``, started as soon as Ray is up and prepared while the
  driver checks the data (``early_client_actors``), sent the ClientApp pickled once (``lean_client_actors``),
  reading their clients' tensors from the clients file an earlier run wrote (``octomil_sim.client_data``),
  and the driver serving one node itself in place of one actor (``simulation.driver_node``, since the
  session of 2026-11-27);
- ``lean, first run``: the same with no clients file to find: the driver writes it during its data
  check, and the actors wait for it;
- ``Ray's defaults``: the head node Ray starts with ``include_dashboard=False`` (its API server runs,
  without the dashboard's pages) and Flower's own ``ClientAppActor``, started by Flower's backend and
  sent the ClientApp with every message, each actor reading the partitions itself, an actor for every
  node (``simulation.driver_node=false``): the runner before these changes (the autoscaler monitor
  stays out on all sides, as it has since an earlier change).
Wall time from a run left alone; peak PSS of the whole process tree from a second run (``bench_scale.measure``).

    python experiments/ray_start.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_scale import COMMON, RESULTS, WORKLOADS, measure, simulation_value
from common import write_block

# the runner with Ray's API server and Flower's client actor back (the autoscaler monitor stays out)
RAY_DEFAULTS = """
import runpy, sys
from contextlib import contextmanager, nullcontext
import octomil_sim.local_ray as local_ray

@contextmanager
def monitor_only():
    from ray._private.node import Node
    start_monitor = Node.start_monitor
    Node.start_monitor = lambda self: None
    try:
        yield
    finally:
        Node.start_monitor = start_monitor

local_ray.lean_head_node = monitor_only
local_ray.lean_client_actors = lambda *args: nullcontext()
local_ray.early_client_actors = lambda *args: []  # Flower starts its actors itself
import octomil_sim.runner as runner
runner.clients_file = lambda spec: None  # the actors read the partitions themselves
sys.argv = ["octomil_sim", *sys.argv[1:], "simulation.driver_node=false"]  # every override stays in argv for Hydra
runpy.run_module("octomil_sim", run_name="__main__", alter_sys=True)
"""

# the runner as it is, on a first run: no clients file of an earlier run to find (the driver writes it)
FIRST_RUN = """
import runpy, shutil, sys
from octomil_sim.client_data import cache_root
shutil.rmtree(cache_root() / "clients", ignore_errors=True)
sys.argv = ["octomil_sim", *sys.argv[1:]]
runpy.run_module("octomil_sim", run_name="__main__", alter_sys=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="+", default=["cnn-mnist5k", "mlp-1000"], choices=sorted(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block", default="ray_start")
    args = parser.parse_args()
    bench_scale = str(Path(__file__).with_name("bench_scale.py"))
    rows = ["| workload | repetitions | plain loop: s, MB | Ray's defaults: s (ratio), MB | lean: s (ratio), MB |"
            " wall saved (s), median (range) | memory saved (MB), median (range) | lean, first run: s (ratio), MB |",
            "|---|---|---|---|---|---|---|---|"]
    for name in args.workloads:
        ov = [*COMMON, *WORKLOADS[name]]
        # run as bench_scale runs the framework (its last round checkpointed), so the times compare with its tables
        rounds = simulation_value(ov, "rounds")
        base = [*ov, "simulation.backend=ray", f"simulation.checkpoint_every={rounds}", "progress=false"]
        # generate the dataset into the cache first: every side then reads the same files
        subprocess.run([sys.executable, bench_scale, "--warm", *ov], check=True)
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "defaults": [], "lean": [], "first": []}
        for rep in range(args.repeat):
            for side in runs:
                out = RESULTS / name / f"ray-start-{side}"
                if side == "plain":
                    cmd = [sys.executable, bench_scale, "--plain", str(out), *ov]
                else:
                    wrapper = {"defaults": RAY_DEFAULTS, "first": FIRST_RUN}.get(side)
                    prefix = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "octomil_sim"]
                    cmd = [*prefix, *base, f"hydra.run.dir={out}"]
                runs[side].append(measure(cmd, out))
                print(f"{name} rep {rep} {side}: {runs[side][-1][0]:.1f} s, {runs[side][-1][1]:.0f} MB", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
        (RESULTS / name).mkdir(parents=True, exist_ok=True)
        (RESULTS / name / "ray_start.json").write_text(json.dumps(runs, indent=1))
        med = {side: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for side, r in runs.items()}
        saved_s = [a[0] - b[0] for a, b in zip(runs["defaults"], runs["lean"], strict=True)]
        saved_mb = [a[1] - b[1] for a, b in zip(runs["defaults"], runs["lean"], strict=True)]
        ratio = {side: statistics.median(w / p for (w, _), (p, _) in zip(runs[side], runs["plain"], strict=True))
                 for side in ("defaults", "lean", "first")}
        rows.append(f"| {name} | {args.repeat} | {med['plain'][0]:.1f}, {med['plain'][1]:.0f} | "
                    f"{med['defaults'][0]:.1f} ({ratio['defaults']:.2f}x), {med['defaults'][1]:.0f} | "
                    f"{med['lean'][0]:.1f} ({ratio['lean']:.2f}x), {med['lean'][1]:.0f} | "
                    f"{statistics.median(saved_s):.1f} ({min(saved_s):.1f} to {max(saved_s):.1f}) | "
                    f"{statistics.median(saved_mb):.0f} ({min(saved_mb):.0f} to {max(saved_mb):.0f}) | "
                    f"{med['first'][0]:.1f} ({ratio['first']:.2f}x), {med['first'][1]:.0f} |")
    write_block(args.block, rows)


if __name__ == "__main__":
    main()
