"""The one Flower ``ClientApp`` of the framework; the algorithm's client half does the work.

A message carries the global ``ArrayRecord`` under ``arrays`` and a ``ConfigRecord`` under
``config`` (with ``server-round``). The reply carries the updated arrays (train) and a
``MetricRecord`` under ``metrics`` with ``num-examples`` and ``partition-id``.

Evaluation reports, on the client's held-out split, ``global_acc`` (the received model as is)
and ``personalized_acc`` (after the algorithm's ``personalize`` step, which never uploads).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from octomil_sim.data import ClientData, FederatedData, federated_data
from octomil_sim.training import LocalTraining, client_seed, evaluate


class ClientAlgorithm:
    """Client half of an algorithm (the server half is a Flower ``Strategy``).

    ``train`` updates ``model`` in place from the received global weights and returns scalar
    metrics; ``personalize`` returns the model this client would deploy (default: the global one).
    """

    def train(self, model: nn.Module, data: ClientData, hp: LocalTraining,
              generator: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    def personalize(self, model: nn.Module, data: ClientData, hp: LocalTraining,
                    generator: torch.Generator) -> nn.Module:
        return model


def build_model(cfg: DictConfig) -> nn.Module:
    """The configured model for the configured dataset's input shape and classes."""
    d = cfg.dataset
    return instantiate(cfg.model.net, input_shape=tuple(d.input_shape), num_classes=d.num_classes)


@dataclass
class ClientRuntime:
    """What one process (a Ray actor) keeps between messages: data, model shape, algorithm."""

    cfg: DictConfig
    data: FederatedData
    algorithm: ClientAlgorithm
    hp: LocalTraining

    def model_from(self, arrays: ArrayRecord) -> nn.Module:
        model = build_model(self.cfg)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model


@lru_cache(maxsize=2)
def client_runtime(cfg_yaml: str) -> ClientRuntime:
    cfg = OmegaConf.create(cfg_yaml)
    torch.set_num_threads(1)  # one core per simulated client; Ray runs several side by side
    s = cfg.simulation
    return ClientRuntime(
        cfg=cfg,
        data=federated_data(cfg),
        algorithm=instantiate(cfg.strategy.client),
        hp=LocalTraining(epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed),
    )


def _generator(rt: ClientRuntime, msg: Message, pid: int, salt: int) -> torch.Generator:
    server_round = int(msg.content["config"]["server-round"])
    return torch.Generator().manual_seed(client_seed(rt.hp.seed + salt, server_round, pid))


def build_client_app(cfg_yaml: str) -> ClientApp:
    """A ClientApp for the run described by ``cfg_yaml`` (the resolved Hydra config as YAML)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    def receive(msg: Message, context: Context) -> tuple[ClientRuntime, int, ClientData, nn.Module]:
        rt = client_runtime(cfg_yaml)
        pid = int(context.node_config["partition-id"])
        return rt, pid, rt.data.client(pid), rt.model_from(msg.content["arrays"])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt, pid, data, model = receive(msg, context)
        metrics = rt.algorithm.train(model, data, rt.hp, _generator(rt, msg, pid, 0))
        metrics.update({"num-examples": data.num_train, "partition-id": pid})
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        rt, pid, data, model = receive(msg, context)
        g_loss, g_acc = evaluate(model, data.x_test, data.y_test)
        personal = rt.algorithm.personalize(copy.deepcopy(model), data, rt.hp,
                                            _generator(rt, msg, pid, 1))
        p_loss, p_acc = evaluate(personal, data.x_test, data.y_test)
        metrics = {
            "global_loss": g_loss, "global_acc": g_acc,
            "personalized_loss": p_loss, "personalized_acc": p_acc,
            "num-examples": data.num_test, "partition-id": pid,
        }
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
