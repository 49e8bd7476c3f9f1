"""FedP3 vs FedAvg on Synthetic(0.5, 0.5), 100 clients, MLP 60-200-200-10: accuracy and bytes, with
uniform clients and with three resource classes (system=heterogeneous: budgets, dropouts, a deadline).

FedP3 (arXiv 2404.09816) reports accuracy at a fraction of FedAvg's communication (its Tables 2-4,
on CIFAR/FEMNIST with larger networks; not reproduced here). This table shows the mechanism on
offline data: each client uploads the head plus `upload_layers` of the two hidden layers, picked by
client id (official OPU rule; on this 3-layer MLP, 2 = OPU2 uploads every layer, 1 = LowerB one hidden
layer); the server prunes the hidden layer a client keeps home to `global_keep` (0.9 official) and
the client keeps its own head. Bytes down fall with `global_keep`, bytes up with the layers kept home.

    python experiments/fedp3_synthetic.py --seeds 0
"""

from __future__ import annotations

import argparse

from common import HERE, mean_std, run_cell, slug, write_block

RESULTS = HERE / "results" / "fedp3_synthetic"
MLP = ["model=mlp", "model.net.hidden=[200,200]"]
HETERO = ["system=heterogeneous"]
PER_CLASS = "strategy.server.global_keep={low:0.2,mid:0.5,high:0.8}"

ROWS = [
    ("FedAvg", ["strategy=fedavg"]),
    ("FedP3 OPU2 (all layers up), keep 0.9", ["strategy=fedp3", "strategy.server.upload_layers=2"]),
    ("FedP3 LowerB (1 hidden layer + head up), keep 0.9", ["strategy=fedp3", "strategy.server.upload_layers=1"]),
    ("FedP3 LowerB, keep 0.5, ordered dropout up to 0.5",
     ["strategy=fedp3", "strategy.server.upload_layers=1", "strategy.server.global_keep=0.5",
      "strategy.client.local_pruning=od",
      "strategy.client.local_sparsity=0.5"]),
    ("FedAvg, heterogeneous clients", ["strategy=fedavg", *HETERO]),
    ("FedP3 LowerB, keep by class 0.2/0.5/0.8, heterogeneous clients",
     ["strategy=fedp3", PER_CLASS, "strategy.server.upload_layers=1", *HETERO]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    table = ["| method | per-client acc. (%) | bottom-10% (%) | global model acc. (%) | MB down | MB up "
             "| failed client-rounds | straggler client-rounds |", "|---|---|---|---|---|---|---|---|"]
    for name, overrides in ROWS:
        runs = [run_cell(RESULTS / slug(name) / f"seed{s}",
                         [*MLP, *overrides, f"simulation.seed={s}", f"simulation.rounds={args.rounds}"])
                for s in args.seeds]
        f = [r["final"] for r in runs]
        col = lambda k, scale=100.0, d=1: mean_std([x[k] for x in f], scale, d)  # noqa: E731
        table.append(f"| {name} | {col('personalized_acc')} | {col('personalized_acc_bottom10')} | "
                     f"{col('global_acc')} | {col('bytes_down', 1e-6)} | {col('bytes_up', 1e-6)} | "
                     f"{mean_std([r['system']['failed_rounds'] for r in runs], 1.0, 0)} | "
                     f"{mean_std([r['system']['straggler_rounds'] for r in runs], 1.0, 0)} |")
    seeds = ", ".join(map(str, args.seeds))
    write_block("fedp3_synthetic", [f"Seeds {seeds}; {args.rounds} rounds, 10 clients per round; MB summed over "
                                    "all rounds of training.", "", *table])


if __name__ == "__main__":
    main()
