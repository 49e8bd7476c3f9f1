"""Benchmark (not a test): where a small round's overhead goes on the local backend, client by client.

``mlr-synthetic11-eval`` of ``bench_scale.py`` (FedAvg, MLR, Synthetic(1, 1), 100 clients, 10 a round,
20 evaluated after every round) for ``--rounds`` rounds, the plain loop and the framework
(``simulation.backend=local``, ``simulation.vectorize=false``) one after the other, ``--repeat`` times.
Each side runs in a child process that times the two compute kernels every side shares
(``training.sgd_epochs`` and ``training.evaluate``: wall time of every call) and reads the CPU
time of each of its threads from ``/proc/self/task`` (sampled every 0.2 s and at exit, so a thread
that ends between samples loses at most 0.2 s). Every repetition's numbers go to
``results/bench_scale/mlr-synthetic11-eval/round_overhead.json``. Per round, in ms (medians over the
repetitions):

- the rounds' wall time (the plain loop's timer around each round; the framework's ``time_s`` rows);
- compute: the two kernels;
- the framework's client thread (Flower's worker running the ClientApp) beyond compute;
- the ServerApp's thread (strategy, grid, results rows, checkpoints);
- Flower's two message threads (LinkState to the client queue, replies back);
- the rest of the rounds' wall time: waits between threads (a hand-off, the GIL).

    python experiments/round_overhead.py --rounds 500 --repeat 3
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_scale import COMMON, RESULTS, WORKLOADS
from common import HERE, write_block

WORKLOAD = "mlr-synthetic11-eval"


def _thread_cpu() -> dict[str, float]:
    """CPU seconds by thread name (Flower's threads named by their function) from /proc/self/task."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{names.get(int(tid), '?')}#{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def child(side: str, out: Path, overrides: list[str]) -> None:
    """Run one side with its kernels timed and its threads' CPU sampled; write ``out/overhead.json``."""
    import octomil_sim.client_app as client_app
    import octomil_sim.training as training
    import strategies.fedavg as fedavg

    kernels = {"sgd_epochs": 0.0, "evaluate": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                kernels[name] += time.perf_counter() - start
        return wrapper

    for name in kernels:
        wrapped = timed(name, getattr(training, name))
        for module in (training, fedavg, client_app):
            if hasattr(module, name):
                setattr(module, name, wrapped)
    cpu: dict[str, float] = {}

    def sample() -> None:
        while True:
            cpu.update(_thread_cpu())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True, name="sampler").start()

    def report() -> None:
        cpu.update(_thread_cpu())
        if side == "plain":
            rounds = sum(json.loads((out / "result.json").read_text())["round_s"])
        else:
            rounds = sum(r["time_s"] for r in json.loads((out / "results.json").read_text())["rounds"])
        (out / "overhead.json").write_text(json.dumps({"rounds_s": rounds, "kernels": kernels, "cpu": cpu}))

    atexit.register(report)
    if side == "plain":
        sys.argv = [str(HERE / "bench_scale.py"), "--plain", str(out), *overrides]
        runpy.run_path(str(HERE / "bench_scale.py"), run_name="__main__")
    else:
        sys.argv = ["octomil_sim", *overrides, "simulation.backend=local", "simulation.vectorize=false",
                    f"hydra.run.dir={out}", "progress=false"]
        runpy.run_module("octomil_sim", run_name="__main__", alter_sys=True)


def share(cpu: dict[str, float], *parts: str) -> float:
    return sum(v for k, v in cpu.items() if any(p in k for p in parts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    parser.add_argument("--block", default="round_overhead", help="README block to write ('' for none)")
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.child[2:])
    overrides = [*COMMON, *WORKLOADS[WORKLOAD], f"simulation.rounds={args.rounds}"]
    subprocess.run([sys.executable, str(HERE / "bench_scale.py"), "--warm", *overrides], check=True)
    rows: dict[str, list[dict]] = {"plain": [], "local": []}
    for rep in range(args.repeat):
        for side in rows:
            out = RESULTS / WORKLOAD / f"overhead-{side}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, str(out), *overrides],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
            got = json.loads((out / "overhead.json").read_text())
            subprocess.run(["rm", "-rf", str(out)], check=True)  # kept: round_overhead.json below
            ms = 1000 / args.rounds
            compute = sum(got["kernels"].values())
            cpu = got["cpu"]
            row = {"round": got["rounds_s"] * ms, "compute": compute * ms}
            if side == "local":
                row["client"] = (share(cpu, "ThreadPoolExecutor") - compute) * ms
                row["server"] = share(cpu, "server_th") * ms
                row["threads"] = share(cpu, "add_messages_to_queue", "put_message_into_state") * ms
                row["waits"] = row["round"] - row["compute"] - row["client"] - row["server"] - row["threads"]
            else:
                row["loop"] = row["round"] - row["compute"]
            rows[side].append(row)
            print(rep, side, {k: round(v, 2) for k, v in row.items()}, flush=True)

    (RESULTS / WORKLOAD / "round_overhead.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))

    def med(side: str, key: str) -> str:
        return f"{statistics.median(r[key] for r in rows[side]):.1f}"

    lines = [f"{WORKLOAD}, {args.rounds} rounds, medians of {args.repeat} repetitions (ms a round):", "",
             "| side | round (wall) | compute: local SGD and evaluation | client thread beyond compute | "
             "server thread | Flower's message threads | the rest: waits between threads |",
             "|---|---|---|---|---|---|---|",
             f"| plain loop | {med('plain', 'round')} | {med('plain', 'compute')} | {med('plain', 'loop')} "
             "(the loop: loads, average, sampling) | | | |",
             f"| local, client by client | {med('local', 'round')} | {med('local', 'compute')} | {med('local', 'client')} "
             f"| {med('local', 'server')} | {med('local', 'threads')} | {med('local', 'waits')} |"]
    if args.block:
        write_block(args.block, lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
