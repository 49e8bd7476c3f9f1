"""Size-proportional client sampling (q-FFL's experiments) and training every client while
aggregating the sampled ones (the official pFedMe code)."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from octomil_sim.server_app import size_proportional_sample
from strategies.fedavg import FedAvg
from strategies.qffl import QFFL
from strategies.tilted import TiltedFedAvg
from tests.helpers import train_reply


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(self.n))


def _reply(value, n, node, loss=1.0):
    return train_reply([np.asarray([value], np.float32)], {"num-examples": n, "loss_before": loss}, node=node)


def test_size_proportional_sampling_frequencies():
    # two clients of 10 and 990 examples, one drawn a round: client 1 must come up ~99% of the time
    picks = [size_proportional_sample([10, 990], 1, seed=0, server_round=r)[0] for r in range(4000)]
    assert np.mean(picks) == pytest.approx(0.99, abs=0.01)
    assert size_proportional_sample([10, 990], 1, 0, 7) == size_proportional_sample([10, 990], 1, 0, 7)


def test_qffl_q0_with_size_sampling_is_fedavg_in_expectation(task_identity):
    # w = 0; client 0 (10 examples) returns w_0 = 1, client 1 (990) returns w_1 = 3. With q = 0, q-FFL's
    # step from one client's reply is that client's model: Delta = L (w - w_k), h = L -> w - Delta / h = w_k.
    # Expected model under p_k = n_k / N: 0.01 * 1 + 0.99 * 3 = 2.98 = FedAvg's example-weighted average.
    sizes, models = [10, 990], [1.0, 3.0]
    strategy = QFFL(client_learning_rate=0.1, q=0.0, client_sizes=sizes, fraction_train=0.5, min_train_nodes=1,
                    min_available_nodes=2)
    grid, arrays = _Grid(2), ArrayRecord([np.zeros(1, np.float32)])
    results = []
    for server_round in range(1, 401):
        (message,) = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        k = message.metadata.dst_node_id
        new, _ = strategy.aggregate_train(server_round, [_reply(models[k], sizes[k], node=k)])
        results.append(float(new.to_numpy_ndarrays()[0][0]))
    fedavg, _ = FedAvg().aggregate_train(1, [_reply(1.0, 10, 0), _reply(3.0, 990, 1)])
    assert float(fedavg.to_numpy_ndarrays()[0][0]) == pytest.approx(2.98)
    assert np.mean(results) == pytest.approx(2.98, abs=0.03)
    # the same strategy with uniform sampling averages to the unweighted 2.0 instead
    uniform = QFFL(client_learning_rate=0.1, q=0.0, sampling="uniform", fraction_train=0.5, min_train_nodes=1,
                   min_available_nodes=2)
    ks = [uniform.configure_train(r, arrays, ConfigRecord(), grid)[0].metadata.dst_node_id for r in range(1, 401)]
    assert np.mean([models[k] for k in ks]) == pytest.approx(2.0, abs=0.15)


def test_unknown_sampling_is_one_line():
    from octomil_sim.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.server.sampling='weighted': allowed: uniform, size_proportional"):
        FedAvg(sampling="weighted")


def test_train_all_clients_aggregates_only_the_sampled(task_identity):
    strategy = FedAvg(train_all_clients=True, fraction_train=0.5, min_train_nodes=2, min_available_nodes=4, seed=3)
    messages = strategy.configure_train(1, ArrayRecord([np.zeros(1, np.float32)]), ConfigRecord(), _Grid(4))
    assert sorted(m.metadata.dst_node_id for m in messages) == [0, 1, 2, 3]  # everybody trains
    sampled = sorted(strategy._aggregated)
    assert len(sampled) == 2
    replies = [_reply(float(10 ** k), 1, node=k) for k in range(4)]  # client k returns 10^k
    new, _ = strategy.aggregate_train(1, replies)
    expected = np.mean([10.0 ** k for k in sampled])  # the unsampled clients' models are left out
    assert float(new.to_numpy_ndarrays()[0][0]) == pytest.approx(expected)


@pytest.mark.parametrize("make", [lambda sizes: FedAvg(client_sizes=sizes, sampling="size_proportional",
                                                        fraction_train=1.0, min_train_nodes=2, min_available_nodes=2),
                                  lambda sizes: TiltedFedAvg(t=0.0, client_sizes=sizes, sampling="size_proportional",
                                                             fraction_train=1.0, min_train_nodes=2,
                                                             min_available_nodes=2)])
def test_size_proportional_sampling_averages_the_sampled_without_sizes(make, task_identity):
    # Both clients drawn (10 and 990 examples; models 1 and 3): the sizes already chose who is drawn, so
    # the sampled replies count once each: (1 + 3) / 2 = 2.0, not the size-weighted 2.98 (sizes twice).
    strategy = make([10, 990])
    strategy.configure_train(1, ArrayRecord([np.zeros(1, np.float32)]), ConfigRecord(), _Grid(2))
    new, _ = strategy.aggregate_train(1, [_reply(1.0, 10, 0), _reply(3.0, 990, 1)])
    assert float(new.to_numpy_ndarrays()[0][0]) == pytest.approx(2.0)
    uniform, _ = FedAvg().aggregate_train(1, [_reply(1.0, 10, 0), _reply(3.0, 990, 1)])
    assert float(uniform.to_numpy_ndarrays()[0][0]) == pytest.approx(2.98)


def test_fedavg_size_sampling_is_the_weighted_average_in_expectation(task_identity):
    # one client a round, drawn with p_k = n_k / N: the mean model over rounds is 0.01 * 1 + 0.99 * 3 = 2.98
    sizes, models = [10, 990], [1.0, 3.0]
    strategy = FedAvg(client_sizes=sizes, sampling="size_proportional", fraction_train=0.5, min_train_nodes=1,
                      min_available_nodes=2)
    grid, arrays, results = _Grid(2), ArrayRecord([np.zeros(1, np.float32)]), []
    for server_round in range(1, 401):
        (message,) = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        k = message.metadata.dst_node_id
        new, _ = strategy.aggregate_train(server_round, [_reply(models[k], sizes[k], node=k)])
        results.append(float(new.to_numpy_ndarrays()[0][0]))
    assert np.mean(results) == pytest.approx(2.98, abs=0.03)
