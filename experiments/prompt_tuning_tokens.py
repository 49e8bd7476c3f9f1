"""Prompt-tuning personalization on token sequences whose label prior differs per client
(dataset=synthetic_tokens, 100 clients): a frozen transformer encoder, a shared head, and either one
soft prompt for everyone (FedAvg over prompt and head) or one per client kept on the client
(strategy=prompt_tuning, FedRep order: prompt first, then head).

    python experiments/prompt_tuning_tokens.py --seeds 0
"""

from __future__ import annotations

import argparse

from common import HERE, mean_std, run_cell, slug, write_block

RESULTS = HERE / "results" / "prompt_tuning_tokens"
COMMON = ["dataset=synthetic_tokens", "model=prompt_transformer", "simulation.lr=0.1"]
ROWS = [
    ("shared prompt and head (FedAvg, frozen base)", ["strategy=fedavg"]),
    ("per-client prompt, shared head (prompt_tuning)", ["strategy=prompt_tuning"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    table = ["| method | per-client acc. (%) | bottom-10% (%) | global model acc. (%) | MB up |", "|---|---|---|---|---|"]
    for name, overrides in ROWS:
        f = [run_cell(RESULTS / slug(name) / f"seed{s}", [*COMMON, *overrides, f"simulation.seed={s}",
                                                           f"simulation.rounds={args.rounds}"])["final"]
             for s in args.seeds]
        col = lambda k, scale=100.0: mean_std([x[k] for x in f], scale)  # noqa: E731
        table.append(f"| {name} | {col('personalized_acc')} | {col('personalized_acc_bottom10')} | "
                     f"{col('global_acc')} | {mean_std([x['bytes_up'] for x in f], 1e-6, 2)} |")
    seeds = ", ".join(map(str, args.seeds))
    write_block("prompt_tuning_tokens", [f"Seeds {seeds}; {args.rounds} rounds, 10 clients per round.", "", *table])


if __name__ == "__main__":
    main()
