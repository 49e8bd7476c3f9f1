"""Personalization on Synthetic(0.5, 0.5): FedAvg vs fine-tuning, Ditto, pFedMe, Scafflix, FedPer.

Runs every row for each seed through ``python -m octomil_sim`` (a finished run is not run again),
collects the ``results.json`` files and writes the table into ``experiments/README.md`` and the plot
``personalization_synthetic.png`` beside it.

    python experiments/personalization_synthetic.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import HERE, mean_std, run_cell, slug, write_block  # noqa: E402

RESULTS = HERE / "results" / "personalization_synthetic"

# name, overrides, the paper's number for per-client accuracy where the issue quotes one
ROWS = [
    ("FedAvg", ["strategy=fedavg"], "~78 (pFedMe Table 1)"),
    ("FedAvg + fine-tuning", ["strategy=finetune"], ""),
    ("Ditto", ["experiment=ditto_synthetic"], ""),
    ("pFedMe", ["experiment=pfedme_synthetic"], "~83 (pFedMe Table 1)"),
    ("Scafflix", ["experiment=scafflix_synthetic"], ""),
    ("FedAvg, MLP", ["strategy=fedavg", "model=mlp"], ""),
    ("FedPer (personal head), MLP", ["strategy=personal_layers", "model=mlp"], ""),
]


def run(name: str, overrides: list[str], seed: int, rounds: int) -> dict:
    out = RESULTS / slug(name) / f"seed{seed}"
    return run_cell(out, [*overrides, f"simulation.seed={seed}", f"simulation.rounds={rounds}"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()

    table = ["| method | per-client acc. (%) | bottom-10% (%) | std across clients | global model acc. (%) "
             "| MB up per round | paper (%) |", "|---|---|---|---|---|---|---|"]
    bars = []
    for name, overrides, paper in ROWS:
        finals = [run(name, overrides, s, args.rounds)["final"] for s in args.seeds]
        col = lambda k, scale=100.0: mean_std([f[k] for f in finals], scale)  # noqa: E731
        mb = statistics.mean(f["bytes_up"] for f in finals) / args.rounds / 1e6
        table.append(f"| {name} | {col('personalized_acc')} | {col('personalized_acc_bottom10')} | "
                     f"{col('personalized_acc_std')} | {col('global_acc')} | {mb:.3f} | {paper} |")
        bars.append((name, statistics.mean(f["personalized_acc"] for f in finals),
                     statistics.mean(f["personalized_acc_bottom10"] for f in finals)))

    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, label="per-client accuracy (weighted mean)")
    ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], 0.4, label="bottom-10% clients")
    ax.set_xticks(list(xs), [b[0] for b in bars], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1), title=f"Synthetic(0.5, 0.5), 100 clients, {args.rounds} rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "personalization_synthetic.png", dpi=100)

    seeds = ", ".join(map(str, args.seeds))
    write_block("personalization_synthetic", [f"Seeds {seeds}; {args.rounds} rounds; mean ± std over seeds.", "",
                                              *table, "", "![personalization on Synthetic](personalization_synthetic.png)"])


if __name__ == "__main__":
    main()
