"""LLM prompt tuning through PEFT (model=hf_causal_lm): a decoder whose base is frozen and never sent,
personalized with a soft prompt of 20 virtual tokens (the seed's prompt_length), on token sequences
whose label prior differs per client (dataset=synthetic_tokens, 50 clients). One prompt for everyone
(FedAvg over the prompt), that shared prompt fine-tuned on each device, and one prompt per client kept in
its state store (Ditto, lambda chosen from {0.1, 1, 2} per client). The tiny GPT-2 / Llama bases are
built offline and pretrained as language models on public rows of the same kind (1,000 Adam steps,
another seed and other users), a stand-in for a pretrained LLM; labels are read as the next token.

Setting: 10 clients a round, 30 rounds, 1 local epoch, batch 20, SGD lr 0.5 on the prompt (prompt
tuning needs a large step; Lester et al. use 0.3 with Adafactor). Metric: per-client accuracy (%) of
the deployed model, clients weighted by test examples, and the per-client perplexity of the label,
exp(per-client test loss), averaged over clients; bytes each client uploads per round; mean +- std.

    python experiments/prompt_tuning_llm.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import statistics

from common import HERE, mean_std, run_cell, slug, write_block

RESULTS = HERE / "results" / "prompt_tuning_llm"
COMMON = ["dataset=synthetic_tokens", "model=hf_causal_lm", "model.net.pretrain_steps=1000", "simulation.num_clients=50",
          "simulation.rounds=30", "simulation.lr=0.5", "simulation.fraction_evaluate=0.0"]
ROWS = [
    ("GPT-2", "shared prompt (FedAvg)", ["strategy=fedavg"], "global"),
    ("GPT-2", "shared prompt + device fine-tuning", ["strategy=finetune"], "personalized"),
    ("GPT-2", "per-client prompt (Ditto)", ["strategy=ditto"], "personalized"),
    ("Llama", "shared prompt (FedAvg)", ["strategy=fedavg", "model.net.architecture=llama"], "global"),
    ("Llama", "per-client prompt (Ditto)", ["strategy=ditto", "model.net.architecture=llama"], "personalized"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    lines = [f"Seeds {', '.join(map(str, args.seeds))}; 50 clients, 10 a round, 30 rounds.", "",
             "| base | prompt | per-client acc. (%) | bottom-10% (%) | label perplexity | bytes up per client and round |",
             "|---|---|---|---|---|---|"]
    for base, name, overrides, which in ROWS:
        runs = [run_cell(RESULTS / slug("_".join(overrides)) / f"seed{s}", [*COMMON, *overrides, f"simulation.seed={s}"])
                for s in args.seeds]
        acc = mean_std([r["final"][f"{which}_acc"] for r in runs])
        bottom = mean_std([r["final"][f"{which}_acc_bottom10"] for r in runs])
        ppl = mean_std([statistics.mean(math.exp(c[f"{which}_loss"]) for c in r["clients"]) for r in runs], 1.0, 3)
        per_round = [statistics.mean(row["bytes_up"] for row in r["rounds"]) / 10 for r in runs]
        lines.append(f"| {base} | {name} | {acc} | {bottom} | {ppl} | {statistics.mean(per_round):,.0f} |")
    write_block("prompt_tuning_llm", lines)


if __name__ == "__main__":
    main()
