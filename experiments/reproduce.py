"""Papers' own tables at their own settings: ``python experiments/reproduce.py --paper pfedme``.

Each cell is one experiment config (``conf/experiment/<paper>_<table>_*.yaml``, which cites the setting)
run for every seed through ``python -m octomil_sim`` (a finished run is not run again); the script
collects the ``results.json`` files and writes the paper-vs-ours table into ``experiments/README.md``.

- ``pfedme``: pFedMe (arXiv 2006.08848) Table 1, Synthetic(0.5, 0.5), MLR and DNN; FedAvg, Per-FedAvg,
  pFedMe. Metric (the paper's, from the official ``utils/plot_utils.average_data``): accuracy pooled over
  all users' test examples, every user evaluated every round, the best round of each run; mean +- std over
  runs. FedAvg's cell is its global model, the others' their personalized models.
- ``qffl``: q-FFL (arXiv 1905.10497) on Synthetic(1, 1) with size-proportional sampling: q = 0, 1, 5;
  the paper's metrics over clients (final round): average, worst 10%, best 10%, variance x 10^4.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

from common import HERE, mean_std, run_cell, write_block

RESULTS = HERE / "results" / "reproduce"

# cell, experiment, what the paper's metric reads, paper number (%)
PFEDME = [
    ("MLR, FedAvg", "pfedme_table1_synthetic_mlr_fedavg", "global_acc", 77.62),
    ("MLR, Per-FedAvg", "pfedme_table1_synthetic_mlr_perfedavg", "personalized_acc", 81.49),
    ("MLR, pFedMe", "pfedme_table1_synthetic_mlr_pfedme", "personalized_acc", 83.20),
    ("DNN, FedAvg", "pfedme_table1_synthetic_dnn_fedavg", "global_acc", 83.64),
    ("DNN, Per-FedAvg", "pfedme_table1_synthetic_dnn_perfedavg", "personalized_acc", 85.01),
    ("DNN, pFedMe", "pfedme_table1_synthetic_dnn_pfedme", "personalized_acc", 86.36),
]
QFFL = [(f"q = {q:g}", "qffl_synthetic_1_1", q) for q in (0.0, 1.0, 5.0)]


def pfedme_table(seeds: list[int], only: str | None) -> None:
    lines = [f"Seeds {', '.join(map(str, seeds))} (runs whose results exist are counted; n = runs per cell); "
             "mean ± population std over runs, as the official `average_data`. Best round: the paper's metric; "
             "final: the last round; theta: the paper's own definition of pFedMe's personalized model (the "
             "official code measures the local model w_i); GM: pFedMe's global model (the paper's pFedMe (GM)).",
             "", "| cell | paper (%) | ours, best round (%) | n | ours, final round (%) | pFedMe theta_i, best round (%) "
             "| pFedMe (GM), best round (%) | gap to paper (points) | minutes per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    ms = partial(mean_std, digits=2, population=True)
    for name, experiment, key, paper in PFEDME:
        runs = []
        for seed in seeds:
            out = RESULTS / experiment / f"seed{seed}"
            if only is None or only == experiment:
                runs.append(run_cell(out, [f"experiment={experiment}", f"simulation.seed={seed}"]))
            elif (out / "results.json").exists():
                runs.append(run_cell(out, []))
        if not runs:
            lines.append(f"| {name} | {paper:.2f} | not run | 0 | | | | | |")
            continue
        best = [r["final"]["best_round"][key]["value"] for r in runs]
        final = [next(x for x in reversed(r["rounds"]) if key in x)[key] for r in runs]
        theta = [r["final"]["best_round"]["theta_acc"]["value"] for r in runs if "theta_acc" in r["final"]["best_round"]]
        gm = [r["final"]["best_round"]["global_acc"]["value"] for r in runs] if "pfedme" in experiment[-6:] else []
        minutes = statistics.mean(r["wall_time_s"] for r in runs) / 60
        lines.append(f"| {name} | {paper:.2f} | {ms(best)} | {len(runs)} | {ms(final)} | {ms(theta) if theta else ''} | "
                     f"{ms(gm) if gm else ''} | {100 * statistics.mean(best) - paper:+.2f} | {minutes:.1f} |")
    write_block("reproduce_pfedme", lines)


def qffl_table(seeds: list[int]) -> None:
    lines = [f"Seeds {', '.join(map(str, seeds))}; per-client test accuracy after the last round (%), "
             "mean ± std over seeds.", "",
             "| q | average | worst 10% | best 10% | variance x 10^4 | pooled |", "|---|---|---|---|---|---|"]
    for name, experiment, q in QFFL:
        runs = [run_cell(RESULTS / f"{experiment}_q{q:g}" / f"seed{seed}",
                         [f"experiment={experiment}", f"strategy.server.q={q}", f"simulation.seed={seed}"])
                for seed in seeds]
        f = [r["final"] for r in runs]
        lines.append(f"| {q:g} | {mean_std([x['global_acc_client_mean'] for x in f])} | "
                     f"{mean_std([x['global_acc_bottom10'] for x in f])} | {mean_std([x['global_acc_top10'] for x in f])} | "
                     f"{mean_std([x['global_acc_var'] for x in f], scale=1e4, digits=0)} | "
                     f"{mean_std([x['global_acc'] for x in f])} |")
    write_block("reproduce_qffl", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", choices=["pfedme", "qffl"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", help="run only the cell whose results folder is this (e.g. "
                        "pfedme_table1_synthetic_mlr_pfedme); the table counts every finished run")
    args = parser.parse_args()
    if args.paper == "pfedme":
        pfedme_table(args.seeds, args.only)
    else:
        qffl_table(args.seeds)


if __name__ == "__main__":
    main()
