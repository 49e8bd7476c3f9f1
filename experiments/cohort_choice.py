"""Benchmark (not a test): when does a cohort train faster than its clients one by one on the CPU?
The evidence behind ``octomil_sim.cohort``'s cost estimate (``CPU_SHARED_STEP``, ``CPU_LONE_STEP``,
``CPU_MAX_PARAMETERS``; ``cohort_pays``, ``pays_off``).

Part 1, the step rule: ``--draws`` random cohorts each of 2, 3, 5 and 10 clients drawn from the 100
clients of the repository's Synthetic sizes (``bench_vectorize.client_sizes("capped")``: lognormal(4, 2)
+ 50 rows capped at 1,000, 80% train), one epoch of batch 20, lr 0.05; MLR and the 60-200-10 MLP.
Each cohort trains both ways from the same start, data and seeds (``training.sgd_epochs`` client by
client, ``cohort.cohort_sgd`` together), median of three each, one torch thread. A least-squares fit
of the times gives the ms per loop step, per cohort step shared by two or more clients and per step of
one client alone; the table then says how far each policy's total time is from always picking the
faster path: the loop always, the cohort always, and the estimate (``cohort_pays``).

Part 2, the size cap: MLPs of growing size (60-200-10 to 784-1000-200-10) on cohorts of 5, 10 and 30
clients of 100 to 800 rows, the cohort's speed-up over the loop.

    python experiments/cohort_choice.py            # block cohort_choice in experiments/README.md
    python experiments/cohort_choice.py --draws 5 --no-write
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench_vectorize import Workload, client_sizes, per_client, vectorized
from common import write_block
from octomil_sim import cohort
from octomil_sim.models import MLP, MLR


def timed_pair(model, xs, ys, work, repeats: int = 3) -> tuple[float, float]:
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loop, together = [], []
    for _ in range(repeats):
        begin = time.perf_counter()
        per_client(model, xs, ys, start, None, work)
        loop.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        vectorized(model, xs, ys, start, None, work)
        together.append(time.perf_counter() - begin)
    return statistics.median(loop), statistics.median(together)


def step_rule(draws: int) -> list[str]:
    sizes_all = client_sizes("capped")
    lines = ["| model | clients | cohorts | cohort vs loop: median (range) | ms a loop step | ms a shared cohort step "
             "| ms a lone step | loop always | cohort always | the estimate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, hidden in (("MLR", None), ("MLP 60-200-10", (200,))):
        work = Workload(name, "capped", 0.8, hidden, 0.05)
        rng = np.random.default_rng(7)
        rows = []
        for k in (2, 3, 5, 10):
            for _ in range(draws):
                picked = rng.choice(len(sizes_all), k, replace=False)
                sizes = [sizes_all[i] - int(np.ceil(round(0.2 * sizes_all[i], 9))) for i in picked]
                torch.manual_seed(0)
                model = MLR((60,), 10) if hidden is None else MLP((60,), 10, hidden)
                xs, ys = [torch.randn(n, 60) for n in sizes], [torch.randint(0, 10, (n,)) for n in sizes]
                counts = cohort.step_counts(sizes, work.batch_size, work.epochs)
                ranked = sorted(counts, reverse=True)
                rows.append((k, sum(counts), ranked[1], ranked[0] - ranked[1], *timed_pair(model, xs, ys, work),
                             cohort.cohort_pays(counts, "cpu")))
        k, total, shared, lone, loop, together, picks = (np.array(c) for c in zip(*rows))
        fit_loop = np.linalg.lstsq(np.c_[total, k], loop, rcond=None)[0]  # per step, per client
        fit_cohort = np.linalg.lstsq(np.c_[shared, lone, k], together, rcond=None)[0]
        best = np.minimum(loop, together).sum()
        chosen = np.where(picks, together, loop).sum()
        for size in (2, 3, 5, 10):
            ratio = loop[k == size] / together[k == size]
            lines.append(f"| {name} | {size} | {int((k == size).sum())} | {np.median(ratio):.2f}x ({ratio.min():.2f}-"
                         f"{ratio.max():.2f}) | | | | | | |")
        lines.append(f"| {name} | all | {len(k)} | | {fit_loop[0] * 1e3:.3f} | {fit_cohort[0] * 1e3:.3f} | "
                     f"{fit_cohort[1] * 1e3:.3f} | +{(loop.sum() / best - 1) * 100:.1f}% | "
                     f"+{(together.sum() / best - 1) * 100:.1f}% | +{(chosen / best - 1) * 100:.1f}% |")
        print(lines[-1], flush=True)
    return lines


def size_cap() -> list[str]:
    lines = ["| model | parameters | cohort vs loop at 5 / 10 / 30 clients | `pays_off` on the CPU |", "|---|---|---|---|"]
    for features, hidden in ((60, (200,)), (60, (1000,)), (784, (200,)), (784, (1000, 200))):
        ratios = []
        for k in (5, 10, 30):
            sizes = np.random.default_rng(k).integers(100, 800, k).tolist()
            torch.manual_seed(0)
            model = MLP((features,), 10, hidden)
            xs, ys = [torch.randn(n, features) for n in sizes], [torch.randint(0, 10, (n,)) for n in sizes]
            loop, together = timed_pair(model, xs, ys, Workload("", "", 1.0, hidden, 0.05))
            ratios.append(loop / together)
        parameters = sum(p.numel() for p in model.parameters())
        label = "-".join(str(w) for w in (features, *hidden, 10))
        lines.append(f"| MLP {label} | {parameters:,} | {' / '.join(f'{r:.2f}x' for r in ratios)} | "
                     f"{'cohort' if cohort.pays_off(model) else 'client by client'} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=25, help="random cohorts of each size (default 25)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["Part 1: random cohorts of the Synthetic sizes, one epoch of batch 20 (the last three columns: "
             "how much longer each policy's total time is than picking the faster path every time)", "",
             *step_rule(args.draws), "", "Part 2: larger models, cohorts of 100 to 800 rows a client", "", *size_cap()]
    if not args.no_write:
        write_block("cohort_choice", lines)


if __name__ == "__main__":
    main()
