"""FedAvg server and client math against numbers worked out by hand."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from helpers import GRAD_B, GRAD_W, constant_mlr, one_example_task, train_reply
from strategies.fedavg import MEASURE_LOSS_BEFORE, FedAvg, FedAvgClient
from strategies.tilted import TiltedFedAvg
from strategies.finetune import FineTuneClient


def test_aggregate_equals_hand_computed_weighted_average(task_identity):
    replies = [
        train_reply([np.array([1.0, 2.0, 3.0], np.float32), np.array([0.0], np.float32)],
                    {"num-examples": 1, "train_loss": 1.0}),
        train_reply([np.array([4.0, 5.0, 6.0], np.float32), np.array([4.0], np.float32)],
                    {"num-examples": 3, "train_loss": 3.0}),
    ]
    arrays, metrics = FedAvg().aggregate_train(1, replies)
    got = arrays.to_numpy_ndarrays()
    # (1*[1,2,3] + 3*[4,5,6]) / 4 = [3.25, 4.25, 5.25];  (1*0 + 3*4) / 4 = 3
    np.testing.assert_allclose(got[0], [3.25, 4.25, 5.25])
    np.testing.assert_allclose(got[1], [3.0])
    assert metrics["train_loss"] == pytest.approx((1 * 1 + 3 * 3) / 4)


def test_client_sgd_step_by_hand():
    # One SGD step at lr 0.5 from zero weights: W = -0.5 * GRAD_W, b = -0.5 * GRAD_B.
    model = constant_mlr(0.0)
    upload, out = FedAvgClient().train(model, one_example_task(lr=0.5))
    assert set(upload) == {"fc.weight", "fc.bias"}
    assert out["train_loss"] == pytest.approx(np.log(3), rel=1e-6)
    np.testing.assert_allclose(model.fc.weight.detach(), [[1 / 3, 2 / 3], [-1 / 6, -1 / 3], [-1 / 6, -1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(model.fc.bias.detach(), -0.5 * GRAD_B, rtol=1e-6)
    np.testing.assert_allclose(upload["fc.weight"], -0.5 * GRAD_W, rtol=1e-6)


def test_fedavg_client_deploys_the_global_model_and_finetune_does_not():
    task = one_example_task()
    model = constant_mlr(0.0)
    assert FedAvgClient().personalize(model, task) is model
    tuned = FineTuneClient(finetune_epochs=2).personalize(constant_mlr(0.0), task)
    # two steps of SGD on the single example: its loss must fall below log(3)
    loss = torch.nn.functional.cross_entropy(tuned(task.data.x_test), task.data.y_test).item()
    assert loss < np.log(3) - 0.5


def test_seeded_sampling_is_a_function_of_seed_and_round(task_identity):
    class Grid:
        def get_node_ids(self):
            return list(range(100, 200))

    def picked(seed, server_round):
        strategy = FedAvg(seed=seed, fraction_train=0.1, min_train_nodes=10, min_available_nodes=100)
        msgs = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), Grid())
        return [m.metadata.dst_node_id for m in msgs]

    assert picked(0, 1) == picked(0, 1)
    assert picked(0, 1) != picked(0, 2)
    assert picked(0, 1) != picked(1, 1)
    assert len(set(picked(0, 1))) == 10


def test_clients_measure_loss_before_only_where_the_server_reads_it(task_identity):
    """A FedAvg server without a fairness policy tells its clients not to measure loss_before (a pass
    over the training split each round); a fairness server, and a server that says nothing (q-FFL's,
    one's own), gets it. Measured or not, the update is the same."""
    class Grid:
        def get_node_ids(self):
            return list(range(1, 11))

    def config(strategy):
        [message, *_] = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid())
        return dict(message.content["config"])

    kw = dict(fraction_train=0.2, min_train_nodes=2, min_available_nodes=10)
    assert config(FedAvg(**kw))[MEASURE_LOSS_BEFORE] is False
    assert MEASURE_LOSS_BEFORE not in config(TiltedFedAvg(t=1.0, **kw))

    class ReadsItself(FedAvg):
        reads_loss_before = True

    assert MEASURE_LOSS_BEFORE not in config(ReadsItself(**kw))
    skipped, skipped_out = FedAvgClient().train(constant_mlr(0.0), one_example_task(config={MEASURE_LOSS_BEFORE: False}))
    measured, measured_out = FedAvgClient().train(constant_mlr(0.0), one_example_task())
    assert "loss_before" not in skipped_out and measured_out["loss_before"] == pytest.approx(np.log(3), rel=1e-6)
    assert skipped_out["train_loss"] == measured_out["train_loss"]
    assert all(torch.equal(skipped[k], measured[k]) for k in measured)
