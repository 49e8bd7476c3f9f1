"""Personalization x fairness in one run, on Synthetic(1, 1), 100 clients (issue 10, part 1).

    python experiments/composition_synthetic.py --seeds 0 1 2 --jobs 2

Each fairness policy alone (on FedAvg), each personalization alone, and the two composed:
Ditto with tilting (t = 1) and Scafflix with bounded group loss (clients split by data size, as in
``fairness_synthetic.py``; bound 1.5). The question: does the fairness part move the worst tenth and the
worst group as it does on FedAvg, while the personalization part keeps its per-client accuracy?
Setting: ``fairness_synthetic.py``'s (10 clients a round, lr 0.05, 1,000 rounds, every client evaluated
once at the end). Metrics: per-client mean over the 100 clients (final round), the worst tenth of
clients, and the worst group's mean; for the deployed global model and for the personalized one.
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor

from common import HERE, mean_std, write_block  # noqa: E402
from fairness_synthetic import cell as fairness_cell  # noqa: E402

RESULTS = HERE / "results" / "composition_synthetic"
BOUND = 1.5
FLIX_BOUNDS = [0.3, 0.2]  # composed with Scafflix the bound is on the FLIX models' training losses (0.13-0.4 here)
TILT = 1.0

ROWS = [
    ("FedAvg", ["strategy=fedavg"]),
    (f"FedAvg + tilted t={TILT:g}", ["personalization=fedavg", "fairness=tilted", f"fairness.policy.t={TILT}"]),
    (f"FedAvg + bounded group loss {BOUND:g}", ["personalization=fedavg", "fairness=bounded_group_loss",
                                                 f"fairness.policy.max_group_loss={BOUND}"]),
    ("Ditto", ["strategy=ditto"]),
    (f"Ditto + tilted t={TILT:g}", ["personalization=ditto", "fairness=tilted", f"fairness.policy.t={TILT}"]),
    ("Scafflix", ["strategy=scafflix"]),
    (f"Scafflix + tilted t={TILT:g}", ["personalization=scafflix", "fairness=tilted", f"fairness.policy.t={TILT}"]),
    (f"Scafflix + bounded group loss {BOUND:g}", ["personalization=scafflix", "fairness=bounded_group_loss",
                                                   f"fairness.policy.max_group_loss={BOUND}"]),
    *[(f"Scafflix + bounded group loss {b:g}", ["personalization=scafflix", "fairness=bounded_group_loss",
                                                 f"fairness.policy.max_group_loss={b}"]) for b in FLIX_BOUNDS],
]


def cell(name: str, overrides: list[str], seed: int, rounds: int) -> dict:
    return fairness_cell(name, overrides, seed, rounds, RESULTS)  # fairness_synthetic's setting, our folder


def worst_group(results: dict, key: str) -> float:
    """The lowest group mean of ``key`` (client mean within the group)."""
    return min(g[f"{key}_client_mean"] for g in results["groups"].values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    jobs = [(name, o, s) for name, o in ROWS for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda j: cell(*j, args.rounds), jobs))
    by_row: dict[str, list[dict]] = {}
    for (name, _, _), results in zip(jobs, done):
        by_row.setdefault(name, []).append(results)
    lines = [f"Synthetic(1, 1), 100 clients, 10 a round, {args.rounds} rounds, seeds {', '.join(map(str, args.seeds))}; "
             "accuracy in %, mean ± std over seeds; client mean = the mean over clients of each client's test "
             "accuracy, worst 10% = the mean of the lowest tenth, worst group = the lower of the two size groups' "
             "client means.", "",
             "| run | global: client mean | global: worst 10% | global: worst group | personalized: client mean "
             "| personalized: worst 10% | personalized: worst group |", "|---|---|---|---|---|---|---|"]
    for name, _ in ROWS:
        rs = by_row[name]
        cells = [mean_std([r["final"]["global_acc_client_mean"] for r in rs]),
                 mean_std([r["final"]["global_acc_bottom10"] for r in rs]),
                 mean_std([worst_group(r, "global_acc") for r in rs]),
                 mean_std([r["final"]["personalized_acc_client_mean"] for r in rs]),
                 mean_std([r["final"]["personalized_acc_bottom10"] for r in rs]),
                 mean_std([worst_group(r, "personalized_acc") for r in rs])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Minutes per run (mean): " + ", ".join(
        f"{name} {statistics.mean(r['wall_time_s'] for r in by_row[name]) / 60:.1f}" for name, _ in ROWS) + "."]
    write_block("composition_synthetic", lines)


if __name__ == "__main__":
    main()
