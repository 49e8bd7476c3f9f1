import math

import pytest
from flwr.app import MetricRecord, RecordDict

from octomil_sim.metrics import evaluate_aggregation, summarize, summarize_clients, train_aggregation


def test_summarize_by_hand():
    # weighted mean (0.2*1 + 0.5*1 + 0.8*2) / 4 = 0.575; std of (0.2, 0.5, 0.8) = sqrt(0.06)
    s = summarize([0.2, 0.5, 0.8], [1, 1, 2])
    assert s["mean"] == pytest.approx(0.575)
    assert s["bottom10"] == pytest.approx(0.2)  # 10% of 3 clients rounds down: the single worst
    assert s["std"] == pytest.approx(math.sqrt(0.06))


def test_bottom10_takes_worst_tenth():
    values = [i / 20 for i in range(20)]  # 20 clients: worst two are 0.0 and 0.05
    assert summarize(values, [1] * 20)["bottom10"] == pytest.approx(0.025)


def test_evaluate_aggregation_reports_mean_bottom_and_spread():
    contents = [
        RecordDict({"metrics": MetricRecord({"global_acc": a, "personalized_acc": p, "num-examples": n,
                                             "partition-id": i})})
        for i, (a, p, n) in enumerate([(0.5, 0.9, 10), (1.0, 1.0, 30)])
    ]
    m = evaluate_aggregation(contents, "num-examples")
    assert m["global_acc"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert m["global_acc_bottom10"] == pytest.approx(0.5)
    assert m["global_acc_std"] == pytest.approx(0.25)
    assert m["personalized_acc"] == pytest.approx((9 + 30) / 40)
    assert m["num_clients"] == 2


def test_train_aggregation_skips_ids():
    contents = [RecordDict({"metrics": MetricRecord({"train_loss": l, "num-examples": n, "partition-id": 7})})
                for l, n in [(1.0, 1), (3.0, 3)]]
    m = train_aggregation(contents, "num-examples")
    assert dict(m) == {"train_loss": pytest.approx(2.5)}


def test_summarize_clients_with_no_weight_falls_back_to_plain_mean():
    rows = [{"global_acc": 0.0, "num_test": 0}, {"global_acc": 1.0, "num_test": 0}]
    assert summarize_clients(rows, "num_test")["global_acc"] == pytest.approx(0.5)
