"""What the official Per-FedAvg evaluation's test leak adds, measured on our finished Table 1 runs.

For every finished ``pfedme_table1_synthetic_*_perfedavg`` run, takes its final global model (the run's
last checkpoint) and evaluates every client's personalized model two ways on its test split: ours (one
alpha step on a training minibatch, ``adapt_on=train``) and the official code's (an alpha step and a beta
step on test minibatches, ``adapt_on=test_official``, CharlieDinh/pFedMe ``userperavg.train_one_step``).
Prints the pooled accuracy of each and the difference.

    python experiments/perfedavg_eval_leak.py
"""

from __future__ import annotations

import copy
import json

import torch
from octomil_sim.spec import RunSpec

from common import HERE
from octomil_sim.checkpoint import load_checkpoint
from octomil_sim.client_app import ClientTask, build_model
from octomil_sim.data import FederatedData
from octomil_sim.state import MemoryStateStore
from octomil_sim.training import LocalTraining, evaluate
from strategies.perfedavg import PerFedAvgClient


def pooled(cfg, data, model, mode: str) -> float:
    c = cfg.strategy.client
    client = PerFedAvgClient(beta=c.get("beta"), adapt_on=mode)
    s = cfg.simulation
    hp = LocalTraining(epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed, local_steps=s.local_steps)
    correct = total = 0
    for k in range(data.num_clients):
        d = data.client(k)
        task = ClientTask(k, s.rounds, d, hp, torch.Generator().manual_seed(k), MemoryStateStore().bind(k), {})
        _, acc = evaluate(client.personalize(copy.deepcopy(model), task), d.x_test, d.y_test)
        correct, total = correct + acc * d.num_test, total + d.num_test
    return correct / total


def main() -> None:
    for run_dir in sorted((HERE / "results" / "reproduce").glob("pfedme_table1_synthetic_*_perfedavg/seed*")):
        found = load_checkpoint(run_dir)
        if found is None or not (run_dir / "results.json").exists():
            continue
        saved = found[1]
        cfg = RunSpec.from_config(json.loads((run_dir / "results.json").read_text())["config"])
        model = build_model(cfg)
        model.load_state_dict(saved["arrays"])
        data = FederatedData(cfg)
        ours, official = pooled(cfg, data, model, "train"), pooled(cfg, data, model, "test_official")
        print(f"{run_dir.parent.name}/{run_dir.name}: final round, ours {100 * ours:.2f}%, official evaluation "
              f"{100 * official:.2f}%, leak adds {100 * (official - ours):+.2f} points")


if __name__ == "__main__":
    main()
