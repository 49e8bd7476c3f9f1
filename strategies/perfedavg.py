"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar; arXiv 2002.07948): federated MAML. Clients learn a global
model w that is a good starting point for one step of local adaptation; the personalized model of
client i is ``w - alpha grad f_i(w)`` (the paper's Eq. 3 objective, its Sec. 4 evaluation).

Client (Algorithm 1, lines 6-9; official code as used for pFedMe's Table 1: CharlieDinh/pFedMe
``FLAlgorithms/users/userperavg.py`` ``train``): each of ``local_rounds`` local steps takes two
minibatches D, D' from the client's carried-over batch stream and
    temp = w - alpha grad f(w; D)                              (``adapt_step``)
    FO:  w <- w - beta grad f(temp; D')                        (``fo_update``, the official code)
    HF:  w <- w - beta (grad f(temp; D') - alpha H(w; D'') grad f(temp; D'))   (``hf_update``, with a
         third minibatch D'' and a Hessian-vector product by double backpropagation; the paper's
         Per-FedAvg (HF), Sec. 5)
alpha is ``simulation.lr`` (the official ``--learning_rate``), beta is ``beta`` (``--beta``; by default
the same as alpha: on data nobody tuned for, scikit-learn digits with 30 rounds, the official Synthetic
value beta = alpha / 10 left the global model undertrained and Per-FedAvg 15 points below FedAvg;
the pFedMe Table 1 experiments set the paper's values).
Server: FedAvg's example-weighted average of the sampled clients' w (official ``aggregate_parameters``).

Personalization (``personalize``): ``adapt_steps`` steps ``w - alpha grad f_i(w; D)`` on minibatches of
the client's *training* split, the paper's one-step adaptation. The official evaluation
(``train_one_step``) instead adapts with a step of size alpha on a *test* minibatch and a step of size
beta on another test minibatch, then evaluates on the test split: test data leak into the model that
is evaluated (CharlieDinh/pFedMe issue #19). We do not copy that.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError
from octomil_sim.training import BatchStream
from strategies.fedavg import FedAvg

__all__ = ["FedAvg", "PerFedAvgClient"]


def adapt_step(w: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """MAML's inner step ``w - alpha grad``."""
    return w - alpha * grad


def fo_update(w: torch.Tensor, grad_at_adapted: torch.Tensor, beta: float) -> torch.Tensor:
    """First-order Per-FedAvg: ``w - beta grad f(temp; D')`` (the second-order term dropped)."""
    return w - beta * grad_at_adapted


def hf_update(w: torch.Tensor, grad_at_adapted: torch.Tensor, hvp: torch.Tensor, alpha: float,
              beta: float) -> torch.Tensor:
    """Hessian-free Per-FedAvg: ``w - beta (grad f(temp; D') - alpha H(w; D'') grad f(temp; D'))``."""
    return w - beta * (grad_at_adapted - alpha * hvp)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph))


def hessian_vector_product(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H(w; (x, y)) v`` by differentiating ``<grad f(w), v>`` once more."""
    grads = _grads(model, x, y, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    return [h.detach() for h in torch.autograd.grad(dot, list(model.parameters()))]


class PerFedAvgClient(ClientAlgorithm):
    frozen_parameters_ok = False  # its update writes every parameter (a frozen base would move or fail)

    def __init__(self, beta: float | None = None, variant: str = "fo", local_rounds: int = 20, adapt_steps: int = 1,
                 adapt_on: str = "train"):
        if adapt_on not in ("train", "test_official"):
            raise ConfigError(f"strategy.client.adapt_on={adapt_on!r}: allowed: train, test_official")
        self.adapt_on = adapt_on
        if beta is not None and beta <= 0:
            raise ConfigError(f"strategy.client.beta={beta}: allowed: a number > 0")
        if variant not in ("fo", "hf"):
            raise ConfigError(f"strategy.client.variant={variant!r}: allowed: fo, hf")
        if not isinstance(adapt_steps, int) or adapt_steps < 0:
            raise ConfigError(f"strategy.client.adapt_steps={adapt_steps!r}: allowed: an integer >= 0")
        self.beta, self.variant, self.local_rounds, self.adapt_steps = beta, variant, local_rounds, adapt_steps

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        d, alpha, beta = task.data, task.hp.lr, self._beta(task)
        stream = task.batch_stream()
        adapted = copy.deepcopy(model)
        losses = []
        model.train()
        for _ in range(self.local_rounds):
            if not task.budget.take():
                break
            first, second = stream.next(), stream.next()
            inner = _grads(model, d.x_train[first], d.y_train[first])
            with torch.no_grad():
                for a, w, g in zip(adapted.parameters(), model.parameters(), inner):
                    a.copy_(adapt_step(w, g, alpha))
            loss = F.cross_entropy(adapted(d.x_train[second]), d.y_train[second])
            outer = list(torch.autograd.grad(loss, list(adapted.parameters())))
            if self.variant == "hf":
                third = stream.next()
                hvp = hessian_vector_product(model, d.x_train[third], d.y_train[third], outer)
                new = [hf_update(w, g, h, alpha, beta) for w, g, h in zip(model.parameters(), outer, hvp)]
            else:
                new = [fo_update(w, g, beta) for w, g in zip(model.parameters(), outer)]
            with torch.no_grad():
                for w, n in zip(model.parameters(), new):
                    w.copy_(n)
            losses.append(loss.item())
        stream.save()
        return model.state_dict(), {"train_loss": sum(losses) / max(len(losses), 1)}

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """``adapt_steps`` steps of size alpha on the next training minibatches of the client's stream
        (read, not advanced: evaluating must not change what the client trains on next).
        ``adapt_on="test_official"`` instead reproduces the official evaluation, for measuring what it
        adds and nothing else: a step of size alpha and one of size beta on the next two minibatches of
        the client's *test* split (its own carried-over stream), then evaluation on that test split."""
        if self.adapt_on == "test_official":
            return self._official_test_adaptation(model, task)
        d = task.data
        return adapt(model, d.x_train, d.y_train, task.batch_stream(), [task.hp.lr] * self.adapt_steps)

    def _official_test_adaptation(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """CharlieDinh/pFedMe ``userperavg.py`` ``train_one_step``: alpha step, then beta step, each on
        the next test minibatch. Leaks test data into the evaluated model (that repository's issue #19)."""
        d = task.data
        stream = BatchStream(d.num_test, task.hp.batch_size, task.state, key="test_batch_position")
        adapt(model, d.x_test, d.y_test, stream, [task.hp.lr, self._beta(task)])
        stream.save()
        return model

    def _beta(self, task: ClientTask) -> float:
        return task.hp.lr if self.beta is None else self.beta


def adapt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stream: BatchStream,
          step_sizes: list[float]) -> nn.Module:
    """One ``adapt_step`` per step size, each on the next minibatch of ``stream`` (not saved here)."""
    model.train()
    for step in step_sizes:
        idx = stream.next()
        grads = _grads(model, x[idx], y[idx])
        with torch.no_grad():
            for w, g in zip(model.parameters(), grads):
                w.copy_(adapt_step(w, g, step))
    return model
