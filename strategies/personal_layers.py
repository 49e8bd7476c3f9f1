"""Personal layers: FedPer (Arivazhagan et al., arXiv 1912.00818) and FedRep (Collins et al.,
arXiv 2102.07078, Algorithm 1; official code lgcollins/FedRep, which also runs FedPer).

Parameters whose names start with one of ``sync_layers`` are shared and averaged by the server; the
rest (``local_layers``) stay on the client, in the client-state store, and are never uploaded.
FedPer trains all layers together (``head_epochs=0``); FedRep first fits the local head with the
shared body frozen for ``head_epochs``, then the body with the head frozen for ``local_epochs``
(``models/Update.py`` ``LocalUpdate.train``: ``local_ep - local_rep_ep`` head epochs, then
``local_rep_ep`` body epochs; the paper's CIFAR scripts use 10 and 1, FEMNIST 10 and 5).
The server averages the uploaded layers and keeps the rest of the global model as it was
(``merge_arrays``). Parameters the model freezes (a pretrained base) are neither trained nor
uploaded: with ``local_layers: [prompt]`` and ``model=prompt_transformer`` this is prompt tuning
(``conf/strategy/prompt_tuning.yaml``), each client's soft prompt kept in the client-state store.

Deployment (``personalize``). A stored head was fitted to the body of the last round the client
trained in; the body has moved since, and a client never sampled has only the untrained initial head
(every client's head starts as the initial global one, as in the official ``main_fedrep.py``). The
official code ends, for FedRep and FedPer alike, with a round in which every client fits its head on
the final body with the body frozen, for ``max(10, local_ep - local_rep_ep)`` epochs, and reports
accuracy after it. ``head_finetune_epochs > 0`` does that before every evaluation: the client's own
head (or the initial one) fitted for that many epochs on the current body, not stored. With
``head_finetune_epochs=0`` the stored head is deployed as is (a never-sampled client fits one for
``max(head_epochs, local_epochs)`` epochs).

Deliberate differences from the official code: plain SGD with ``simulation.lr`` (official: momentum
0.5, weight decay 1e-4, lr 0.01, batch 10); the head fit at deployment runs at every evaluation
instead of in one extra training round, and leaves the stored head unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from flwr.app import ArrayRecord
from torch import nn

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError
from strategies.fedavg import FedAvg, local_sgd

LOCAL = "local_layers"


def merge_arrays(full: ArrayRecord, partial: ArrayRecord) -> ArrayRecord:
    """``full`` with the arrays that ``partial`` carries replaced, key order kept."""
    merged = ArrayRecord()
    for key in full.keys():
        merged[key] = partial[key] if key in partial else full[key]
    return merged


class PartialUpload(FedAvg):
    """FedAvg over whatever layers the clients upload, merged into the global model it sent."""

    def aggregate_train(self, server_round, replies):
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self.sent is None:
            return averaged, metrics
        return merge_arrays(self.sent, averaged), metrics


class PersonalLayersClient(ClientAlgorithm):
    """Give ``sync_layers`` or ``local_layers`` (name prefixes of the model's parameters).
    ``head_epochs``: FedRep's head epochs per round (0 = FedPer); ``head_finetune_epochs``: epochs of
    fitting the local layers on the current shared ones before deploying (0 = deploy as stored)."""

    def __init__(self, sync_layers: list[str] | None = None, local_layers: list[str] | None = None,
                 head_epochs: int = 0, head_finetune_epochs: int = 0):
        if (sync_layers is None) == (local_layers is None):
            raise ConfigError(f"strategy.client.sync_layers={sync_layers}, strategy.client.local_layers="
                              f"{local_layers}: allowed: exactly one of the two, a list of layer-name prefixes")
        self.sync_layers = None if sync_layers is None else tuple(sync_layers)
        self.local_layers = None if local_layers is None else tuple(local_layers)
        for key, value in (("head_epochs", head_epochs), ("head_finetune_epochs", head_finetune_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"strategy.client.{key}={value}: allowed: an integer >= 0")
        self.head_epochs, self.head_finetune_epochs = head_epochs, head_finetune_epochs

    def is_local(self, name: str) -> bool:
        if self.local_layers is not None:
            return name.startswith(self.local_layers)
        return not name.startswith(self.sync_layers)

    def _split(self, model: nn.Module) -> tuple[list, list]:
        local = [p for n, p in model.named_parameters() if self.is_local(n)]
        shared = [p for n, p in model.named_parameters() if not self.is_local(n)]
        if not local or not shared:
            names = ", ".join(n for n, _ in model.named_parameters())
            key, value = ("local_layers", self.local_layers) if self.local_layers else ("sync_layers", self.sync_layers)
            raise ConfigError(f"strategy.client.{key}={list(value)}: leaves {'no' if not local else 'every'} "
                              f"parameter local; allowed: name prefixes that split {names}")
        return local, shared

    def check(self, model: nn.Module) -> None:
        self._split(model)

    def _with_own_layers(self, model: nn.Module, task: ClientTask) -> bool:
        stored = task.state.load(LOCAL)
        if stored is not None:
            model.load_state_dict(stored, strict=False)
        return stored is not None

    def objective_model(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """The received shared layers with the client's own local ones (what its training starts from)."""
        own = copy.deepcopy(model)
        self._with_own_layers(own, task)
        return own

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        local, shared = self._split(model)
        self._with_own_layers(model, task)
        if self.head_epochs > 0:  # FedRep: head on the frozen body, then body on the frozen head
            local_sgd(model, replace(task, private=None), epochs=self.head_epochs, params=local)  # stays home: no DP-SGD
            loss = local_sgd(model, task, params=shared)
        else:  # FedPer: everything together
            loss = local_sgd(model, task)
        state = model.state_dict()
        task.state.save(LOCAL, {k: v for k, v in state.items() if self.is_local(k)})
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # e.g. a frozen base
        return {k: v for k, v in state.items() if not self.is_local(k) and k not in frozen}, {"train_loss": loss}

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """The client's own local layers (the received ones if it never trained), fitted on the
        current shared layers for ``head_finetune_epochs`` (or, when that is 0, only if it never
        trained); nothing is stored."""
        local, _ = self._split(model)
        own = self._with_own_layers(model, task)
        epochs = self.head_finetune_epochs or (0 if own else max(self.head_epochs, task.hp.epochs))
        if epochs:
            local_sgd(model, task, epochs=epochs, params=local)
        return model
