"""Hierarchical (group + device) personalization on digits whose groups differ: 40 clients in 4
groups (client k in group k % 4), group g's images rotated by g x 90 degrees (IFCA's rotated clusters,
arXiv 2006.04088, Sec. 5.2); the rows dealt evenly (devices alike within a group) or by Dirichlet(0.5)
label skew (devices differ within a group too). Against one global model (FedAvg) and device-only
personalization (FedAvg then fine-tuning on the device), with groups known (groups file) or found by
IFCA's loss-based assignment.

Setting: MLP (200 hidden), 10 clients a round, 150 rounds, 1 local epoch, lr 0.05, batch 20,
fine-tuning 5 epochs. Metric: the final models' per-client accuracy (clients weighted by test
examples): "global" is the model a client receives (the group's model under group models), "+ device"
is after its fine-tuning; the worst group's mean. Mean +- std over seeds.

    python experiments/hierarchical_digits.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse

from common import HERE, mean_std, run_cell, slug, write_block

RESULTS = HERE / "results" / "hierarchical_digits"
CLIENTS, GROUPS = 40, 4
COMMON = ["dataset=digits_groups", "partition=natural_id", "model=mlp", f"simulation.num_clients={CLIENTS}",
          "simulation.rounds=150", "simulation.fraction_evaluate=0.0"]
SETTINGS = [
    ("rotation; devices alike within a group", "rotate", ["dataset.source.transform=rotate"]),
    ("rotation + Dir(0.5) label skew; devices differ", "rotate_label_skew",
     ["dataset.source.transform=rotate", "dataset.source.label_skew=0.5"]),
]
ROWS = [
    ("one global model (FedAvg) / + device fine-tuning", ["strategy=finetune"]),
    ("group models, known groups / + device fine-tuning", ["strategy=hierarchical"]),
    ("group models, IFCA assignment / + device fine-tuning",
     ["strategy=hierarchical", "strategy.server.assignment=loss", f"strategy.server.num_groups={GROUPS}"]),
]


def recovered(clients: list[dict]) -> float:
    """The share of clients whose IFCA group is their true group's (k % GROUPS), each found group
    matched to the true group most of its clients come from (cluster purity)."""
    by_found: dict[int, list[int]] = {}
    for c in clients:
        by_found.setdefault(int(c["group"]), []).append(int(c["partition_id"]) % GROUPS)
    return sum(max(members.count(g) for g in set(members)) for members in by_found.values()) / len(clients)


def main() -> None:
    from strategies.hierarchical import write_groups

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    groups = write_groups(RESULTS / "groups.json", CLIENTS, [f"group{g}" for g in range(GROUPS)])
    lines = [f"Seeds {', '.join(map(str, args.seeds))}; accuracy (%) of the model received / after device "
             "fine-tuning; worst group's mean after fine-tuning.", "",
             "| data | method | received model | + device fine-tuning | worst group + device | IFCA: clients in their true group (%) |",
             "|---|---|---|---|---|---|"]
    for setting, folder, data in SETTINGS:
        for name, overrides in ROWS:
            runs = [run_cell(RESULTS / folder / slug(name.split(" /")[0]) / f"seed{s}",
                             [*COMMON, *overrides, *data, f"groups_file={groups}", f"simulation.seed={s}"])
                    for s in args.seeds]
            worst = [min(g["personalized_acc"] for g in r["groups"].values()) for r in runs]
            found = mean_std([recovered(r["clients"]) for r in runs]) if "IFCA" in name else "-"
            lines.append(f"| {setting} | {name.split(' /')[0]} | {mean_std([r['final']['global_acc'] for r in runs])} | "
                         f"{mean_std([r['final']['personalized_acc'] for r in runs])} | {mean_std(worst)} | {found} |")
    write_block("hierarchical_digits", lines)


if __name__ == "__main__":
    main()
