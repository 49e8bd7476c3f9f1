"""Across-client summaries: the numbers personalization and fairness papers report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from flwr.app import MetricRecord, RecordDict

from octomil_sim.errors import ConfigError

#: per-client metrics that get a summary in every evaluation round and in ``final`` (besides these,
#: any other per-client ``*_acc`` / ``*_loss`` an algorithm reports, e.g. pFedMe's ``theta_acc``)
SUMMARIZED = ("global_acc", "personalized_acc", "global_loss", "personalized_loss")


def summarized_keys(row: dict) -> list[str]:
    """The per-client keys of ``row`` that get summaries: ``SUMMARIZED`` first, then other accuracies
    and losses in the row's order."""
    extra = [k for k in row if k.endswith(("_acc", "_loss")) and k not in SUMMARIZED]
    return [k for k in SUMMARIZED if k in row] + extra

#: what each summary key means; written into ``results.json`` as ``metric_definitions``
DEFINITIONS = {
    "<m>": "pooled over clients: sum_k n_k m_k / sum_k n_k with n_k the client's test examples; for an "
           "accuracy this is correct predictions / test examples of all clients (pFedMe, Ditto, Flower's "
           "weighted default)",
    "<m>_client_mean": "unweighted mean over clients: 1/K sum_k m_k (q-FFL, TERM, FederatedScope's fairness "
                       "reports)",
    "<m>_bottom10": "mean over the worst 10% of clients (at least one): the lowest accuracies, the highest "
                    "losses",
    "<m>_top10": "mean over the best 10% of clients (at least one): the highest accuracies, the lowest losses",
    "<m>_std": "population std of the unweighted per-client values around their unweighted mean",
    "<m>_var": "population variance of the unweighted per-client values (q-FFL reports it x 10^4)",
    "worst_tenth_improvement": "mean over the worst 10% of clients by global_acc of (personalized_acc - "
                               "global_acc): the same clients on both sides",
    "worst_group_improvement": "(results.json top level) with groups_file: min over groups g of the mean over "
                               "g's clients of (personalized_acc - global_acc), with every group's value; "
                               "without groups: worst_tenth_improvement, the worst tenth as the one group",
    "best_round": "for the pooled and _client_mean value of every per-client accuracy and loss: the best "
                  "value over the evaluation rounds and its round (max for accuracies, min for losses, the "
                  "earliest round on a tie); over the clients evaluated in that round "
                  "(simulation.fraction_evaluate), so it is optimistic unless every client is evaluated",
}


def higher_is_better(key: str) -> bool:
    """Accuracies go up, losses go down: which end of a metric is its worst."""
    return "loss" not in key


def summarize(values: Sequence[float], weights: Sequence[float], higher_better: bool = True) -> dict[str, float]:
    """Pooled (``weights``-weighted) mean, unweighted ``client_mean``, the means of the worst and the
    best 10% of clients (at least one each; worst = lowest when ``higher_better``, else highest),
    and the population std and variance of the unweighted values (each client counted once)."""
    n = len(values)
    if n == 0:
        return {k: float("nan") for k in ("mean", "client_mean", "bottom10", "top10", "std", "var")}
    total = sum(weights)
    avg = sum(values) / n
    mean = sum(v * w for v, w in zip(values, weights)) / total if total else avg
    tail = max(1, math.floor(0.1 * n))
    ordered = sorted(values, reverse=not higher_better)  # worst first
    var = sum((v - avg) ** 2 for v in values) / n
    return {"mean": mean, "client_mean": avg, "bottom10": sum(ordered[:tail]) / tail,
            "top10": sum(ordered[-tail:]) / tail, "std": math.sqrt(var), "var": var}


def summarize_clients(rows: Sequence[dict], weight_key: str = "num-examples") -> dict[str, float]:
    """Flat summary of per-client rows: ``global_acc`` (pooled), ``global_acc_client_mean``,
    ``global_acc_bottom10`` / ``_top10`` (worst / best tenth), ``global_acc_std`` / ``_var``, the same
    for every other key in ``SUMMARIZED`` that the rows carry, and ``worst_tenth_improvement`` (over
    the worst tenth by global accuracy) when the rows carry both accuracies."""
    out: dict[str, float] = {"num_clients": float(len(rows))}
    weights = [float(r[weight_key]) for r in rows]
    for key in summarized_keys(rows[0]) if rows else []:
        if all(key in r for r in rows):
            s = summarize([float(r[key]) for r in rows], weights, higher_is_better(key))
            out[key] = s.pop("mean")
            out.update({f"{key}_{name}": v for name, v in s.items()})
    if rows and "global_acc" in rows[0] and "personalized_acc" in rows[0]:
        out["worst_tenth_improvement"] = mean_improvement(worst_tenth(rows, "global_acc"))
    return out


def worst_tenth(rows: Sequence[dict], key: str) -> list[dict]:
    """The worst 10% of ``rows`` by ``key`` (at least one), ties broken by position."""
    tail = max(1, math.floor(0.1 * len(rows)))
    order = sorted(range(len(rows)), key=lambda i: (float(rows[i][key]) * (1 if higher_is_better(key) else -1), i))
    return [rows[i] for i in order[:tail]]


def mean_improvement(rows: Sequence[dict]) -> float:
    """Mean over ``rows`` (clients) of ``personalized_acc - global_acc``: what personalization gains them."""
    if not rows:
        return float("nan")
    return sum(float(r["personalized_acc"]) - float(r["global_acc"]) for r in rows) / len(rows)


def best_rounds(rounds: Sequence[dict], keys: Sequence[str] | None = None) -> dict[str, dict]:
    """For every evaluated per-round ``key`` (default: the accuracies and losses, pooled and client
    mean), ``{"value": best, "round": r}``: the maximum over rounds for accuracies, the minimum for
    losses; the earliest round wins a tie."""
    if keys is None:
        names = list(dict.fromkeys(k for r in rounds for k in summarized_keys(r) if k != "train_loss"))
        keys = [f"{m}{suffix}" for m in names for suffix in ("", "_client_mean")]
    out = {}
    for key in keys:
        seen = [(float(r[key]), r["round"]) for r in rounds if key in r and not math.isnan(float(r[key]))]
        if seen:
            sign = 1 if higher_is_better(key) else -1
            value, rnd = max(seen, key=lambda vr: (sign * vr[0], -vr[1]))
            out[key] = {"value": value, "round": rnd}
    return out


def client_rows(contents: Sequence[RecordDict]) -> list[dict]:
    """The per-client metrics of reply contents, one flat dict per client."""
    rows = []
    for content in contents:
        row: dict = {}
        for record in content.values():  # (content.metric_records builds a new dict at every call)
            if isinstance(record, MetricRecord):
                row.update(record)
        rows.append(row)
    return rows


def evaluate_aggregation(contents: list[RecordDict], weight_key: str,
                         groups: dict[int, str] | None = None) -> MetricRecord:
    """Flower ``evaluate_metrics_aggr_fn``: the across-client summary of one evaluation round; with
    ``groups``, also ``group_<g>_global_acc`` / ``group_<g>_personalized_acc`` (pooled over the group's
    clients evaluated this round), so a run's per-group curves are logged while it runs."""
    rows = client_rows(contents)
    summary = summarize_clients(rows, weight_key)
    for g in sorted({groups[int(r["partition-id"])] for r in rows}) if groups else ():
        members = [r for r in rows if groups[int(r["partition-id"])] == g]
        total = sum(float(r[weight_key]) for r in members) or 1.0
        for key in ("global_acc", "personalized_acc"):
            if key in members[0]:
                summary[f"group_{g}_{key}"] = sum(float(r[key]) * float(r[weight_key]) for r in members) / total
    return MetricRecord(summary)


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
    unknown = sorted(k for k in groups if num_clients is not None and not 0 <= k < num_clients)
    if unknown:
        raise ConfigError(f"groups_file={str(path)!r}: names clients {unknown[:5]}{'...' if len(unknown) > 5 else ''} "
                          f"that do not exist; allowed: client ids 0..{num_clients - 1} (simulation.num_clients)")
    missing = sorted(set(range(num_clients or 0)) - set(groups))
    if missing:
        raise ConfigError(f"groups_file={str(path)!r}: clients {missing[:5]}{'...' if len(missing) > 5 else ''} "
                          f"have no group; allowed: a group for every client 0..{num_clients - 1}")
    return groups


def group_summaries(rows: Sequence[dict], groups: dict[int, str], weight_key: str) -> dict[str, dict]:
    """``summarize_clients`` of each group's clients; ``improvement`` is the mean over the group's
    clients of ``personalized_acc - global_acc`` (when the rows carry both)."""
    names = sorted({groups[r["partition_id"]] for r in rows})
    out = {}
    for g in names:
        members = [r for r in rows if groups[r["partition_id"]] == g]
        out[g] = summarize_clients(members, weight_key)
        out[g].pop("worst_tenth_improvement", None)
        if "personalized_acc" in members[0]:
            out[g]["improvement"] = mean_improvement(members)
    return out


def worst_group_improvement(summaries: dict[str, dict] | None, final: dict) -> dict:
    """The worst group's ``improvement`` (personalized minus global accuracy), which group it is and
    every group's; without groups (``summaries`` None), the worst tenth of clients by global accuracy
    (``final["worst_tenth_improvement"]``) as the one group."""
    scored = {g: m["improvement"] for g, m in (summaries or {}).items() if "improvement" in m}
    if not scored:
        if "worst_tenth_improvement" not in final:
            return {}
        return {"value": final["worst_tenth_improvement"], "group": "worst 10% by global_acc"}
    worst = min(sorted(scored), key=lambda g: scored[g])
    return {"value": scored[worst], "group": worst, "per_group": scored}
