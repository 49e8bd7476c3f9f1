"""Ditto (Li, Hu, Beirami, Smith; arXiv 2012.04221, Algorithm 1; official code litian96/ditto).

Global model ``w``: FedAvg. Personal model ``v_k`` of client k solves
``min_v F_k(v) + lam/2 ||v - w*||^2`` (Eq. 2); each time k is selected it takes ``personal_epochs``
of ``v_k <- v_k - personal_lr (grad F_k(v_k) + lam (v_k - w^t))`` (Alg. 1 line 7,
``octomil_sim.training.prox_grad_step``), anchored at the received global ``w^t``, then its FedAvg
update of ``w`` (Alg. 1 lines 4-5). ``v_k`` lives in the client-state store and is never uploaded.
``lam`` is Ditto's lambda: 0 is local training, large values pull ``v_k`` to ``w``.
``DittoClient.train_cohort`` takes the same steps (Alg. 1 lines 4-7) for all clients of a message
together (``octomil_sim.cohort``; equal to ``train`` up to float rounding) when each client has one
lambda; per-client lambda selection runs client by client.

Per-client lambda (``lam`` a list of candidates; the paper's experiments, Sec. 5 / App. C, and the
official ``flearn/trainers_MTL/ditto.py`` with ``--dynamic_lam 1``): each client holds out the last
``val_fraction`` of its training split as validation (``flearn/models/client.py``: 10%, and then
trains both ``w`` and ``v_k`` on the rest). At every personal step the gradient at ``v_k`` is taken
once, one candidate step is formed per lambda, and the candidate with the lowest validation loss
becomes ``v_k`` (``select_step``); so a client may switch lambda from step to step. The paper's
candidates for data without strong attacks are {0.1, 1, 2} (for strong attacks {0.05, 0.1, 0.2}),
and a client with fewer than 5 validation examples uses a fixed lambda (1, resp. 0.1): here the
middle candidate (``fallback_lam``), which is that value for both of the paper's sets.

Defaults (``conf/strategy/ditto.yaml``): the paper's recipe for unknown data, candidates {0.1, 1, 2}
selected per client; the personal model takes as many local steps with the same learning rate as
the global one (the official solver runs ``local_iters`` steps of each, on the same batches, with
one ``learning_rate``). With ``simulation.local_steps`` (and ``personal_epochs`` null) the personal
model takes that many steps on the very minibatches the global update takes next from the client's
``BatchStream``, as the official solver does.

Deliberate differences from the official code:
- In epochs (no ``simulation.local_steps``), global and personal steps draw their own minibatch
  orders (official: the same batch for the personal step and the following global step).
- A client never selected for training deploys ``v_k`` made by one personal update from the current
  ``w`` (not kept); the official code evaluates its never-trained initial copy.
- The fallback for clients with few validation examples is the paper's rule; the official code has
  none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from octomil_sim.client_app import ClientTask, Tensors
from octomil_sim.cohort import vectorizes
from octomil_sim.client_data import ClientData
from octomil_sim.errors import ConfigError, number_list
from octomil_sim.training import evaluate, minibatch_passes, prox_grad_step
from strategies.fedavg import FedAvg, FedAvgClient, cohort_local_sgd, local_sgd

__all__ = ["FedAvg", "DittoClient"]

PERSONAL = "ditto_v"
MIN_VALIDATION = 5  # the paper: clients with fewer validation examples use a fixed lambda


def select_step(v: list[torch.Tensor], grad: list[torch.Tensor], anchor: list[torch.Tensor], lams: list[float],
                lr: float, val_loss: Callable[[list[torch.Tensor]], float]) -> tuple[list[torch.Tensor], float]:
    """One personal step per candidate ``lam`` (``prox_grad_step`` with the same gradient); returns
    the step with the lowest ``val_loss`` and its lambda (the first one on ties)."""
    best, best_lam, best_loss = None, None, float("inf")
    for lam in lams:
        step = [prox_grad_step(t, g, a, lam, lr) for t, g, a in zip(v, grad, anchor)]
        loss = val_loss(step)
        if best is None or loss < best_loss:
            best, best_lam, best_loss = step, lam, loss
    return best, best_lam


def fallback_lam(lams: list[float]) -> float:
    """The lambda of a client with too few validation examples: the middle candidate (the lower
    middle of an even count); the paper's 1 for {0.1, 1, 2} and 0.1 for {0.05, 0.1, 0.2}."""
    ordered = sorted(lams)
    return ordered[(len(ordered) - 1) // 2]


def validation_split(data: ClientData, val_fraction: float) -> tuple[ClientData, torch.Tensor, torch.Tensor]:
    """(the client's data without its validation rows, x_val, y_val): the last ``val_fraction`` of its
    training split (the split is already in random order), at least one row kept for training."""
    n_train = max(1, int(data.num_train * (1 - val_fraction)))
    rest = ClientData(data.x_train[:n_train], data.y_train[:n_train], data.x_test, data.y_test)
    return rest, data.x_train[n_train:], data.y_train[n_train:]


class DittoClient(FedAvgClient):
    """``lam``: one lambda >= 0, or a list of candidates each client selects from on validation data.
    ``personal_epochs`` / ``personal_lr``: None = ``simulation.local_epochs`` / ``simulation.lr``."""

    reuses_model = False  # its own train: a copy of the template per client, as before

    def __init__(self, lam: float | list[float] = (0.1, 1.0, 2.0), personal_epochs: int | None = None,
                 personal_lr: float | None = None, val_fraction: float = 0.1):
        lams = number_list(lam)
        if lams is None or any(x < 0 for x in lams):
            raise ConfigError(f"strategy.client.lam={lam}: allowed: a number >= 0, or a list of such numbers "
                              "(candidates each client selects from on validation data)")
        if len(lams) > 1 and not 0 < val_fraction < 1:
            raise ConfigError(f"strategy.client.val_fraction={val_fraction}: allowed: a number in (0, 1) "
                              "when lam is a list of candidates")
        self.lams = [float(x) for x in lams]
        self.personal_epochs, self.personal_lr, self.val_fraction = personal_epochs, personal_lr, val_fraction

    @property
    def selects(self) -> bool:
        return len(self.lams) > 1

    def _personal_update(self, global_model: nn.Module, task: ClientTask) -> tuple[nn.Module, float]:
        """``personal_epochs`` of Ditto's personal step from the stored ``v_k`` (or ``w^t`` the
        first time), anchored at the global ``w^t``; returns it and the mean lambda it used."""
        personal = copy.deepcopy(global_model)
        stored = task.state.load(PERSONAL)
        if stored is not None:
            personal.load_state_dict(stored)
        anchor = [p.detach().clone() for p in global_model.parameters()]
        lr = task.hp.lr if self.personal_lr is None else self.personal_lr
        epochs = task.hp.epochs if self.personal_epochs is None else self.personal_epochs
        lams, data = self.lams, task.data
        if self.selects:
            data, x_val, y_val = validation_split(task.data, self.val_fraction)
            if len(y_val) < MIN_VALIDATION:
                lams = [fallback_lam(self.lams)]
        batches = None
        if task.hp.local_steps is not None and self.personal_epochs is None:
            # the batches the global update takes next (the stream's position is not saved here)
            batches = replace(task, data=data).batch_stream().take(task.hp.local_steps)
        if len(lams) == 1:
            local_sgd(personal, replace(task, data=data, private=None), epochs=epochs, lr=lr, anchor=anchor,
                      lam=lams[0], batches=batches)  # the personal model never leaves: no DP-SGD
            return personal, lams[0]
        return personal, self._selecting_sgd(personal, anchor, task, data, x_val, y_val, lams, lr, epochs, batches)

    @staticmethod
    def _selecting_sgd(personal: nn.Module, anchor: list[torch.Tensor], task: ClientTask, data: ClientData,
                       x_val: torch.Tensor, y_val: torch.Tensor, lams: list[float], lr: float, epochs: int,
                       batches: list[torch.Tensor] | None = None) -> float:
        """Minibatch personal steps (``epochs`` passes, or one step per index tensor in ``batches``),
        each the ``select_step`` among ``lams``; the mean lambda chosen. Parameters the model freezes
        (a pretrained base) stay as they are."""
        moving = [p.requires_grad for p in personal.parameters()]
        params = [p for p, m in zip(personal.parameters(), moving) if m]
        anchor = [a for a, m in zip(anchor, moving) if m]
        probe = copy.deepcopy(personal)
        probe_params = [q for q, m in zip(probe.parameters(), moving) if m]

        def val_loss(step: list[torch.Tensor]) -> float:
            with torch.no_grad():
                for q, t in zip(probe_params, step):
                    q.copy_(t)
            return evaluate(probe, x_val, y_val)[0]

        chosen = []
        personal.train()
        for pass_batches in minibatch_passes(data.num_train, task.hp.batch_size, epochs, task.generator, batches):
            for idx in pass_batches:
                if not task.budget.take():
                    break
                personal.zero_grad()
                F.cross_entropy(personal(data.x_train[idx]), data.y_train[idx]).backward()
                v = [p.detach() for p in params]
                step, lam = select_step(v, [p.grad for p in params], anchor, lams, lr, val_loss)
                with torch.no_grad():
                    for p, t in zip(params, step):
                        p.copy_(t)
                chosen.append(lam)
        return sum(chosen) / len(chosen) if chosen else float("nan")

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        personal, lam = self._personal_update(model, task)
        task.state.save(PERSONAL, personal.state_dict())
        if self.selects:  # the validation rows are held out from the global update too (official code)
            task = replace(task, data=validation_split(task.data, self.val_fraction)[0])
        upload, metrics = super().train(model, task)
        return upload, {**metrics, "ditto_lam": lam}

    def train_cohort(self, models: list[nn.Module], tasks: list[ClientTask]):
        """``train`` for a cohort at once when each client has one lambda (no selection, which tries
        every candidate at every step): the personal steps of all clients together, anchored at the
        received global model, then FedAvg's local steps together, drawing from each client's
        generator and budget in ``train``'s order."""
        if self.selects or type(self).train is not DittoClient.train or not vectorizes(models[0]):
            return None
        personals = []
        for model, task in zip(models, tasks):
            personal = copy.deepcopy(model)
            if (stored := task.state.load(PERSONAL)) is not None:
                personal.load_state_dict(stored)
            personals.append(personal)
        anchors = [[p.detach().clone() for p in model.parameters()] for model in models]
        hp = tasks[0].hp
        batches = None
        if hp.local_steps is not None and self.personal_epochs is None:
            batches = [task.batch_stream().take(hp.local_steps) for task in tasks]  # not saved, as in train
        cohort_local_sgd(personals, tasks, epochs=hp.epochs if self.personal_epochs is None else self.personal_epochs,
                         lr=self.personal_lr, anchors=anchors, lam=self.lams[0], batches=batches)
        results = self.fedavg_cohort(models, tasks)
        for personal, task in zip(personals, tasks):  # written once both cohorts succeeded
            task.state.save(PERSONAL, personal.state_dict())
        return [(upload, {**metrics, "ditto_lam": self.lams[0]}) for upload, metrics in results]

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        stored = task.state.load(PERSONAL)
        if stored is None:  # never selected: run its personal update once, keep nothing
            return self._personal_update(model, task)[0]
        model.load_state_dict(stored)
        return model
