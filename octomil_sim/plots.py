"""The run's figure: accuracy per round, and the final per-client accuracy distribution."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # (no pyplot: no global figure state, and a lighter import)


def plot_run(results: dict, path: Path) -> Path:
    fig = Figure(figsize=(11, 4))
    curve, hist = fig.subplots(1, 2)
    rounds = [r for r in results["rounds"] if "global_acc" in r]
    xs = [r["round"] for r in rounds]
    for key, color in (("global_acc", "tab:blue"), ("personalized_acc", "tab:orange")):
        curve.plot(xs, [r[key] for r in rounds], color=color, label=f"{key} (mean)")
        curve.plot(xs, [r[f"{key}_bottom10"] for r in rounds], color=color, ls="--", label=f"{key} (bottom 10%)")
    curve.set(xlabel="round", ylabel="accuracy", title=results["name"])
    curve.legend(fontsize=8)
    clients = results["clients"]
    bins = [i / 20 for i in range(21)]
    hist.hist([c["global_acc"] for c in clients], bins=bins, alpha=0.6, label="global")
    hist.hist([c["personalized_acc"] for c in clients], bins=bins, alpha=0.6, label="personalized")
    hist.set(xlabel="client accuracy (final)", ylabel="clients", title="per-client accuracy")
    hist.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # (Agg: Figure.savefig draws a PNG on Agg's canvas without pyplot's backend)
    return path
