"""Multi-task clients: the same digit images, three tasks (which digit, 10 classes; odd or even;
5-9 or 0-4), 45 clients, client k doing task k % 3 (dataset=digits_groups transform=tasks). One model
for everyone (a shared head mixes the tasks' labels), per-task heads on a shared body
(strategy=multitask), and per-client heads (personal layers, FedPer). Results per task.

Setting: MLP (200 hidden), 10 clients a round, 150 rounds, 1 local epoch, lr 0.05, batch 20; the
personal-layer heads fitted on the final body for 10 epochs before evaluation (its default). Metric:
accuracy (%) of the deployed model (per-task heads: the task's head, then after 5 epochs of
fine-tuning on the device; FedPer: the client's head), the mean over each task's clients weighted by test examples; mean +- std over seeds.

    python experiments/multitask_digits.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse

from common import HERE, mean_std, run_cell, slug, write_block

RESULTS = HERE / "results" / "multitask_digits"
TASKS = ["digit", "parity", "high"]
CLIENTS = 45
COMMON = ["dataset=digits_groups", "partition=natural_id", "model=mlp", f"simulation.num_clients={CLIENTS}",
          "dataset.source.transform=tasks", f"dataset.source.num_groups={len(TASKS)}",
          f"dataset.source.tasks=[{','.join(TASKS)}]", "simulation.rounds=150", "simulation.fraction_evaluate=0.0"]
ROWS = [
    ("one model, shared head (FedAvg)", ["strategy=fedavg"], "global_acc"),
    ("shared body, per-task heads (multitask)", ["strategy=multitask"], "global_acc"),
    ("shared body, per-task heads + device fine-tuning (multitask)", ["strategy=multitask"], "personalized_acc"),
    ("shared body, per-client heads (FedPer)", ["strategy=personal_layers"], "personalized_acc"),
]


def main() -> None:
    from strategies.hierarchical import write_groups

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    groups = write_groups(RESULTS / "groups.json", CLIENTS, TASKS)
    lines = [f"Seeds {', '.join(map(str, args.seeds))}; accuracy (%) per task of the deployed model.", "",
             "| method | " + " | ".join(TASKS) + " | MB up |", "|---" * (len(TASKS) + 2) + "|"]
    for name, overrides, key in ROWS:
        runs = [run_cell(RESULTS / slug("_".join(overrides)) / f"seed{s}",
                         [*COMMON, *overrides, f"groups_file={groups}", f"simulation.seed={s}"]) for s in args.seeds]
        cols = [mean_std([r["groups"][t][key] for r in runs]) for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cols) + f" | {mean_std([r['final']['bytes_up'] for r in runs], 1e-6, 2)} |")
    write_block("multitask_digits", lines)


if __name__ == "__main__":
    main()
