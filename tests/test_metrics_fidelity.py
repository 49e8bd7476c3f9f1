"""Metric definitions of issue 'paper fidelity', checked on numbers worked out by hand."""

import pytest

from octomil_sim.metrics import (
    best_rounds,
    group_summaries,
    summarize,
    summarize_clients,
    worst_group_improvement,
)


def test_worst_tenth_of_a_loss_is_its_highest_values():
    losses = [round(0.1 * i, 1) for i in range(1, 21)]  # 0.1 .. 2.0, 20 clients
    s = summarize(losses, [1] * 20, higher_better=False)
    assert s["bottom10"] == pytest.approx(1.95)  # mean(1.9, 2.0)
    assert s["top10"] == pytest.approx(0.15)  # mean(0.1, 0.2)
    rows = [{"global_loss": v, "num_test": 1} for v in losses]
    assert summarize_clients(rows, "num_test")["global_loss_bottom10"] == pytest.approx(1.95)


def test_pooled_and_client_mean_accuracy():
    # client A: 1 of 10 right, client B: 90 of 90 right -> pooled 91/100, client mean (0.1 + 1.0)/2
    rows = [{"global_acc": 0.1, "num_test": 10}, {"global_acc": 1.0, "num_test": 90}]
    out = summarize_clients(rows, "num_test")
    assert out["global_acc"] == pytest.approx(0.91)
    assert out["global_acc_client_mean"] == pytest.approx(0.55)
    assert out["global_acc_std"] == pytest.approx(0.45)  # around the unweighted mean 0.55
    assert out["global_acc_var"] == pytest.approx(0.2025)


def test_worst_group_improvement_without_groups_uses_the_same_clients():
    # 10 clients; the worst by global accuracy is client 0 (0.1 -> 0.3: +0.2). Client 9 has the lowest
    # personalized accuracy, but it is not the global model's worst client: it must not be compared.
    rows = [{"global_acc": 0.1, "personalized_acc": 0.3, "num_test": 1}]
    rows += [{"global_acc": 0.5 + 0.01 * i, "personalized_acc": 0.6, "num_test": 1} for i in range(1, 9)]
    rows += [{"global_acc": 0.9, "personalized_acc": 0.05, "num_test": 1}]
    final = summarize_clients(rows, "num_test")
    assert final["worst_tenth_improvement"] == pytest.approx(0.2)
    assert worst_group_improvement(None, final) == {"value": pytest.approx(0.2), "group": "worst 10% by global_acc"}


def test_worst_group_improvement_with_groups():
    rows = [
        {"partition_id": 0, "global_acc": 0.5, "personalized_acc": 0.7, "num_test": 1},  # a: +0.2
        {"partition_id": 1, "global_acc": 0.5, "personalized_acc": 0.6, "num_test": 3},  # a: +0.1
        {"partition_id": 2, "global_acc": 0.8, "personalized_acc": 0.7, "num_test": 1},  # b: -0.1
    ]
    groups = group_summaries(rows, {0: "a", 1: "a", 2: "b"}, "num_test")
    assert groups["a"]["improvement"] == pytest.approx(0.15)  # unweighted over the group's clients
    assert groups["b"]["improvement"] == pytest.approx(-0.1)
    worst = worst_group_improvement(groups, {"worst_tenth_improvement": 0.5})
    assert worst["group"] == "b" and worst["value"] == pytest.approx(-0.1)
    assert worst["per_group"]["a"] == pytest.approx(0.15)


def test_best_round_max_for_accuracy_min_for_loss():
    rounds = [
        {"round": 1, "global_acc": 0.5, "global_loss": 1.0},
        {"round": 2, "global_acc": 0.8, "global_loss": 0.7},
        {"round": 3, "global_acc": 0.8, "global_loss": 0.9},
        {"round": 4, "train_loss": 0.1},  # a round that was not evaluated
    ]
    best = best_rounds(rounds)
    assert best["global_acc"] == {"value": 0.8, "round": 2}  # the earliest of a tie
    assert best["global_loss"] == {"value": 0.7, "round": 2}
