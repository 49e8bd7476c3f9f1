"""Across-client summaries: the numbers personalization and fairness papers report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from flwr.app import MetricRecord, RecordDict

from octomil_sim.errors import ConfigError

#: per-client metrics that get a weighted mean, bottom-10% mean and spread in every summary
SUMMARIZED = ("global_acc", "personalized_acc", "global_loss", "personalized_loss")


def summarize(values: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """Example-weighted mean, mean of the worst 10% of clients (at least one) and the std across
    clients (population std, each client counted once)."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "bottom10": float("nan"), "std": float("nan")}
    total = sum(weights)
    mean = sum(v * w for v, w in zip(values, weights)) / total if total else sum(values) / n
    worst = sorted(values)[: max(1, math.floor(0.1 * n))]
    avg = sum(values) / n
    std = math.sqrt(sum((v - avg) ** 2 for v in values) / n)
    return {"mean": mean, "bottom10": sum(worst) / len(worst), "std": std}


def summarize_clients(rows: Sequence[dict], weight_key: str = "num-examples") -> dict[str, float]:
    """Flat summary of per-client rows: ``global_acc`` (weighted mean), ``global_acc_bottom10``,
    ``global_acc_std``, and the same for every other key in ``SUMMARIZED`` that the rows carry."""
    out: dict[str, float] = {"num_clients": float(len(rows))}
    weights = [float(r[weight_key]) for r in rows]
    for key in SUMMARIZED:
        if rows and key in rows[0]:
            s = summarize([float(r[key]) for r in rows], weights)
            out[key], out[f"{key}_bottom10"], out[f"{key}_std"] = s["mean"], s["bottom10"], s["std"]
    return out


def client_rows(contents: Sequence[RecordDict]) -> list[dict]:
    """The per-client metrics of reply contents, one flat dict per client."""
    rows = []
    for content in contents:
        row: dict = {}
        for record in content.metric_records.values():
            row.update(record)
        rows.append(row)
    return rows


def evaluate_aggregation(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower ``evaluate_metrics_aggr_fn``: the across-client summary of one evaluation round."""
    return MetricRecord(summarize_clients(client_rows(contents), weight_key))


def train_aggregation(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower ``train_metrics_aggr_fn``: example-weighted mean of every scalar training metric."""
    rows = client_rows(contents)
    total = sum(float(r[weight_key]) for r in rows) or 1.0
    keys = [k for k, v in rows[0].items() if k not in (weight_key, "partition-id")
            and isinstance(v, (int, float))] if rows else []
    return MetricRecord({k: sum(float(r[k]) * float(r[weight_key]) for r in rows) / total for k in keys})


def load_groups(path: str | Path, num_clients: int | None = None) -> dict[int, str]:
    """``groups_file``: a JSON object ``{client id: group name}`` covering clients 0..num_clients-1."""
    try:
        raw = json.loads(Path(path).read_text())
        groups = {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"groups_file={str(path)!r}: cannot be read as a JSON object of client id -> group "
                          f"({type(err).__name__})") from None
    missing = sorted(set(range(num_clients or 0)) - set(groups))
    if missing:
        raise ConfigError(f"groups_file={str(path)!r}: clients {missing[:5]}{'...' if len(missing) > 5 else ''} "
                          f"have no group; allowed: a group for every client 0..{num_clients - 1}")
    return groups


def group_summaries(rows: Sequence[dict], groups: dict[int, str], weight_key: str) -> dict[str, dict]:
    """``summarize_clients`` of each group's clients."""
    names = sorted({groups[r["partition_id"]] for r in rows})
    return {g: summarize_clients([r for r in rows if groups[r["partition_id"]] == g], weight_key) for g in names}
