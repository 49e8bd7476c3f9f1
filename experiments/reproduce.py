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
- ``term``: TERM (arXiv 2007.01162) client-level tilting at the official code's step on the same
  Synthetic(1, 1) setting (FedAvg and q-FFL q=1 are the ``qffl`` runs), the same metrics.
- ``ditto``: Ditto (arXiv 2012.04221), clean setting, the official Fashion MNIST recipe on MNIST-5k:
  global model, local-only (lambda 0), Ditto lambda 1 and per-client lambda; the official metric
  (accuracy pooled over devices' test examples) and the spread over devices.
- ``maxfl``: MaxFL (arXiv 2205.14840): the share of clients the global model appeals to, FedAvg
  against MaxFL, on label-skewed digits.
The setting of each is in its experiment config and in ``experiments/README.md``; none of the TERM,
Ditto and MaxFL papers' own table numbers could be read offline, so those tables have no paper column.
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


def accuracy_cells(runs: list[dict], prefix: str = "global") -> list[str]:
    """The per-client summaries q-FFL, TERM and Ditto report, as table cells (mean ± std over runs):
    average (unweighted over clients), worst 10%, best 10%, variance x 10^4, pooled."""
    f = [r["final"] for r in runs]
    return [mean_std([x[prefix + "_acc_client_mean"] for x in f]), mean_std([x[prefix + "_acc_bottom10"] for x in f]),
            mean_std([x[prefix + "_acc_top10"] for x in f]),
            mean_std([x[prefix + "_acc_var"] for x in f], scale=1e4, digits=0), mean_std([x[prefix + "_acc"] for x in f])]


def qffl_table(seeds: list[int]) -> None:
    lines = [f"Seeds {', '.join(map(str, seeds))}; per-client test accuracy after the last round (%), "
             "mean ± std over seeds.", "",
             "| q | average | worst 10% | best 10% | variance x 10^4 | pooled |", "|---|---|---|---|---|---|"]
    for name, experiment, q in QFFL:
        runs = [run_cell(RESULTS / f"{experiment}_q{q:g}" / f"seed{seed}",
                         [f"experiment={experiment}", f"strategy.server.q={q}", f"simulation.seed={seed}"])
                for seed in seeds]
        lines.append(f"| {q:g} | {' | '.join(accuracy_cells(runs))} |")
    write_block("reproduce_qffl", lines)


def fairness_row(name: str, runs: list[dict]) -> str:
    """A TERM-table row: ``accuracy_cells`` of the global model and the number of runs."""
    return f"| {name} | {' | '.join(accuracy_cells(runs))} | {len(runs)} |"


FAIRNESS_HEAD = ["| method | average | worst 10% | best 10% | variance x 10^4 | pooled | runs |",
                 "|---|---|---|---|---|---|---|"]
TERM = [("TERM t=0.1, official step (server_lr 0.1)", "term_synthetic_1_1", []),
        ("TERM t=0.1, the paper's step (server_lr 1)", "term_synthetic_1_1_step1", ["strategy.server.server_lr=1"])]


def existing(folder: str, seeds: list[int]) -> list[dict]:
    return [run_cell(RESULTS / folder / f"seed{s}", []) for s in seeds
            if (RESULTS / folder / f"seed{s}" / "results.json").exists()]


def term_table(seeds: list[int], only: str | None) -> None:
    lines = [f"Seeds {', '.join(map(str, seeds))}; per-client test accuracy after the last round (%), mean ± std "
             "over seeds; FedAvg and q-FFL are the q-FFL table's runs (q = 0 is fair_flearn's FedAvg: the "
             "plain average of the clients drawn with p_k = n_k/N).", "", *FAIRNESS_HEAD]
    lines.append(fairness_row("FedAvg (q-FFL q=0)", existing("qffl_synthetic_1_1_q0", seeds)))
    lines.append(fairness_row("q-FFL q=1", existing("qffl_synthetic_1_1_q1", seeds)))
    for name, folder, overrides in TERM:
        if only is None or only == folder:
            runs = [run_cell(RESULTS / folder / f"seed{s}", ["experiment=term_synthetic_1_1", *overrides,
                                                               f"simulation.seed={s}"]) for s in seeds]
        else:
            runs = existing(folder, seeds)
        lines.append(fairness_row(name, runs) if runs else f"| {name} | not run | | | | | 0 |")
    write_block("reproduce_term", lines)


DITTO = [("lam1", ["strategy.client.lam=1.0"]), ("lam0", ["strategy.client.lam=0.0"]),
         ("dynamic", ["strategy.client.lam=[0.1,1.0,2.0]"])]


def ditto_table(seeds: list[int], only: str | None) -> None:
    runs = {}
    for folder, overrides in DITTO:
        name = f"ditto_clean_mnist5k_{folder}"
        if only is None or only == name:
            runs[folder] = [run_cell(RESULTS / name / f"seed{s}", ["experiment=ditto_clean_mnist5k", *overrides,
                                                                    f"simulation.seed={s}"]) for s in seeds]
        else:
            runs[folder] = existing(name, seeds)
    rows = [("Global model (FedAvg; the lambda = 1 runs' w)", runs["lam1"], "global"),
            ("Local only (Ditto, lambda = 0)", runs["lam0"], "personalized"),
            ("Ditto, lambda = 1 (the official clean run)", runs["lam1"], "personalized"),
            ("Ditto, lambda per client from {0.1, 1, 2}", runs["dynamic"], "personalized")]
    lines = [f"Seeds {', '.join(map(str, seeds))}; after the last round (%), mean ± std over seeds. Pooled: the "
             "official metric (correct over all devices' test examples); average, worst / best 10% and variance: "
             "over the per-device accuracies.", "",
             "| model deployed | pooled | average | worst 10% | best 10% | variance x 10^4 | runs |",
             "|---|---|---|---|---|---|---|"]
    for name, rs, prefix in rows:
        if not rs:
            lines.append(f"| {name} | not run | | | | | 0 |")
            continue
        *per_client, pooled = accuracy_cells(rs, prefix)  # pooled first: Ditto's own metric
        lines.append(f"| {name} | {pooled} | {' | '.join(per_client)} | {len(rs)} |")
    write_block("reproduce_ditto", lines)


MAXFL = [("FedAvg (the same clients)", "maxfl_appeal_digits_fedavg",
          ["strategy.server._target_=strategies.fedavg.FedAvg", "~strategy.server.eta_g", "~strategy.server.eps"]),
         ("MaxFL (eta_g 1, eps 1e-3)", "maxfl_appeal_digits", [])]
MAXFL_ALPHAS = [0.3, 0.1]  # the config's Dirichlet alpha, and a stronger skew where local models are hard to beat


def maxfl_table(seeds: list[int]) -> None:
    lines = [f"Seeds {', '.join(map(str, seeds))}; after the last round, mean ± std over seeds. Appealing: the "
             "global model's training loss at most the client's own model's (rho_i); deployed: each client's "
             "better model of the two on its training loss.", "",
             "| Dirichlet alpha | server | clients the global model appeals to (%) | global model, average acc. (%) | "
             "global model, worst 10% (%) | deployed model, average acc. (%) | deployed model, worst 10% (%) |",
             "|---|---|---|---|---|---|---|"]
    for alpha in MAXFL_ALPHAS:
        for name, folder, overrides in MAXFL:
            folder = folder if alpha == 0.3 else f"{folder}_alpha{alpha:g}"
            runs = [run_cell(RESULTS / folder / f"seed{s}", ["experiment=maxfl_appeal_digits", *overrides,
                                                               f"partition.alpha={alpha}", f"simulation.seed={s}"])
                    for s in seeds]
            f = [r["final"] for r in runs]
            lines.append(f"| {alpha:g} | {name} | {mean_std([r['appeal']['served_fraction'] for r in runs])} | "
                         f"{mean_std([x['global_acc_client_mean'] for x in f])} | "
                         f"{mean_std([x['global_acc_bottom10'] for x in f])} | "
                         f"{mean_std([x['personalized_acc_client_mean'] for x in f])} | "
                         f"{mean_std([x['personalized_acc_bottom10'] for x in f])} |")
    write_block("reproduce_maxfl", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", choices=["pfedme", "qffl", "term", "ditto", "maxfl"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", help="run only the cell whose results folder is this (e.g. "
                        "pfedme_table1_synthetic_mlr_pfedme, term_synthetic_1_1, ditto_clean_mnist5k_lam0); "
                        "the table counts every finished run")
    args = parser.parse_args()
    if args.paper == "pfedme":
        pfedme_table(args.seeds, args.only)
    elif args.paper == "qffl":
        qffl_table(args.seeds)
    elif args.paper == "term":
        term_table(args.seeds, args.only)
    elif args.paper == "ditto":
        ditto_table(args.seeds, args.only)
    else:
        maxfl_table(args.seeds)


if __name__ == "__main__":
    main()
