"""Check (not a test): four cells of the fairness table (seed 0, 1,000 rounds) run client by client and
vectorized, two at a time, through ``fairness_synthetic.cell`` (its setting and size groups) into a
scratch folder; prints the table in experiments/README.md, "Speed".

    python experiments/vectorize_check.py [--out /tmp/vec_check]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fairness_synthetic import BOUND, cell

CELLS = {"fedavg": ["strategy=fedavg"], "tilted_t1": ["strategy=tilted", "strategy.server.t=1.0"],
         "qffl_q1": ["strategy=qffl", "strategy.server.q=1.0"],
         "bgl": ["strategy=bounded_group_loss", f"strategy.server.max_group_loss={BOUND}"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/vec_check"))
    args = parser.parse_args()
    runs = [(name, vectorize) for name in CELLS for vectorize in ("false", "true")]

    def final(run: tuple[str, str]) -> dict:
        name, vectorize = run
        overrides = [*CELLS[name], f"simulation.vectorize={vectorize}"]
        return cell(f"{name} vectorize {vectorize}", overrides, 0, 1000, results=args.out)["final"]

    with ThreadPoolExecutor(2) as pool:
        finals = dict(zip(runs, pool.map(final, runs)))
    print("| cell (seed 0, 1,000 rounds) | global acc: client by client / vectorized | bottom-10% | mean loss |")
    print("|---|---|---|---|")
    for name in CELLS:
        a, b = finals[(name, "false")], finals[(name, "true")]
        print(f"| {name} | {100 * a['global_acc']:.2f} / {100 * b['global_acc']:.2f} | "
              f"{100 * a['global_acc_bottom10']:.2f} / {100 * b['global_acc_bottom10']:.2f} | "
              f"{a['global_loss']:.4f} / {b['global_loss']:.4f} |")


if __name__ == "__main__":
    main()
