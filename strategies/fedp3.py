"""FedP3 (Yi, Gazagnadou, Richtárik, Lyu; arXiv 2404.09816, Algorithm 1): federated personalized and
privacy-friendly network pruning under model heterogeneity.

Server (global pruning): for each sampled client i it prunes the global model to the client's
capacity, ``target_sparsity`` of its resource class (``system``), by magnitude, layer by layer
(``magnitude_mask``; weight matrices and kernels only, biases stay dense), and sends the pruned
network sparse-coded (``sparse_encode``: the kept values and a bit mask), so smaller clients cost
fewer bytes down. It also names the ``upload_layers`` layers the client will send back this round
(drawn per round and client from the seed; all layers if null).
Client (local pruning, personalized training): prunes a further ``local_sparsity`` of what it got,
trains that subnetwork (masked SGD: pruned weights stay zero), keeps it as its personalized model
in the client-state store, and uploads only its assigned layers, sparse-coded (partial-layer upload).
Server aggregation (``masked_average``): each entry of each layer is the weighted average over the
clients that uploaded that layer and kept that entry; an entry nobody sent keeps its value.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError
from octomil_sim.system import SystemModel
from strategies.fedavg import FedAvg, local_sgd

PERSONAL = "fedp3_personal"
VALUES, BITS = "::values", "::mask"


# --- update math ---------------------------------------------------------------------------------
def magnitude_mask(tensor: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * numel)`` entries of largest magnitude (ties: lower index);
    1-d tensors (biases) are kept whole."""
    if tensor.dim() < 2 or sparsity <= 0:
        return torch.ones_like(tensor, dtype=torch.bool)
    flat = tensor.detach().abs().flatten()
    keep = int(round((1 - sparsity) * flat.numel()))
    order = torch.from_numpy(np.argsort(-flat.numpy(), kind="stable"))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(tensor.shape)


def masked_average(values: list[torch.Tensor], masks: list[torch.Tensor], weights: list[float],
                   previous: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k m_k v_k / sum_k w_k m_k`` entry by entry; ``previous`` where no client kept it."""
    num = torch.zeros_like(previous, dtype=torch.float64)
    den = torch.zeros_like(previous, dtype=torch.float64)
    for v, m, w in zip(values, masks, weights):
        num += w * m.double() * v.double()
        den += w * m.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), previous.double()).to(previous.dtype)


def sparse_encode(state: Tensors, masks: dict[str, torch.Tensor]) -> Tensors:
    """Each tensor as its kept values plus a bit mask (dense when nothing is pruned)."""
    out = {}
    for name, t in state.items():
        m = masks.get(name)
        if m is None or bool(m.all()):
            out[name] = t.detach()
        else:
            out[name + VALUES] = t.detach()[m]
            out[name + BITS] = torch.from_numpy(np.packbits(m.flatten().numpy()))
    return out


def sparse_decode(record: ArrayRecord, like: Tensors) -> tuple[Tensors, dict[str, torch.Tensor]]:
    """The tensors (zeros where pruned) and masks of the names of ``like`` that ``record`` carries."""
    tensors, masks = {}, {}
    for name, ref in like.items():
        if name in record:
            tensors[name] = torch.from_numpy(record[name].numpy().copy()).reshape(ref.shape)
            masks[name] = torch.ones_like(ref, dtype=torch.bool)
        elif name + VALUES in record:
            bits = np.unpackbits(record[name + BITS].numpy())[: ref.numel()].astype(bool)
            mask = torch.from_numpy(bits).reshape(ref.shape)
            t = torch.zeros_like(ref)
            t[mask] = torch.from_numpy(record[name + VALUES].numpy().copy())
            tensors[name], masks[name] = t, mask
    return tensors, masks


def layer_of(name: str) -> str:
    """A parameter's layer: its module path (``body.0.weight`` -> ``body.0``)."""
    return name.rsplit(".", 1)[0]


# --- server half ---------------------------------------------------------------------------------
class FedP3(FedAvg):
    """``target_sparsity``: one fraction in [0, 1) for every client, or ``{resource class: fraction}``
    over the classes of ``system``; ``upload_layers``: layers each client uploads per round (null: all)."""

    def __init__(self, target_sparsity: float | dict = 0.5, upload_layers: int | None = None,
                 system: dict | None = None, num_clients: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.system = SystemModel.build(system, self.seed, num_clients)
        names, given = [c.name for c in self.system.classes], target_sparsity
        if isinstance(target_sparsity, (int, float)):
            target_sparsity = {n: float(target_sparsity) for n in names}
        target_sparsity = dict(target_sparsity)
        if set(target_sparsity) != set(names) or not all(0 <= s < 1 for s in target_sparsity.values()):
            raise ConfigError(f"strategy.server.target_sparsity={given}: allowed: a number in [0, 1), "
                              f"or one for each resource class of system ({', '.join(names)})")
        if upload_layers is not None and upload_layers < 1:
            raise ConfigError(f"strategy.server.upload_layers={upload_layers}: allowed: null or an integer >= 1")
        self.target_sparsity, self.upload_layers = target_sparsity, upload_layers

    def sparsity(self, client: int) -> float:
        return self.target_sparsity[self.system.of(client).name]

    def assigned_layers(self, server_round: int, client: int, layers: list[str]) -> list[str]:
        if self.upload_layers is None or self.upload_layers >= len(layers):
            return list(layers)
        rng = np.random.default_rng([self.seed, server_round, client, 79])
        return sorted(rng.choice(layers, size=self.upload_layers, replace=False).tolist())

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        state = arrays.to_torch_state_dict()
        layers = sorted({layer_of(n) for n in state})
        out = []
        for m in messages:
            client = m.metadata.dst_node_id
            masks = {n: magnitude_mask(t, self.sparsity(client)) for n, t in state.items()}
            pruned = {n: t * masks[n] for n, t in state.items()}
            cfg = ConfigRecord({**dict(m.content[self.configrecord_key]),
                                "upload": self.assigned_layers(server_round, client, layers)})
            content = RecordDict({self.arrayrecord_key: ArrayRecord(sparse_encode(pruned, masks)),
                                  self.configrecord_key: cfg})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=client))
        return out

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self.sent is None:
            return None, None
        previous = self.sent.to_torch_state_dict()
        decoded = [sparse_decode(r.content[self.arrayrecord_key], previous) for r in valid]
        weights = [float(r.content["metrics"][self.weighted_by_key]) for r in valid]
        merged = {}
        for name, prev in previous.items():
            got = [(t[name], m[name], w) for (t, m), w in zip(decoded, weights) if name in t]
            merged[name] = masked_average([g[0] for g in got], [g[1] for g in got], [g[2] for g in got], prev) \
                if got else prev
        contents = [r.content for r in valid]
        return ArrayRecord(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


# --- client half ---------------------------------------------------------------------------------
class FedP3Client(ClientAlgorithm):
    """``local_sparsity``: the share of the received (already pruned) weights the client prunes away
    itself, by magnitude, before training."""

    def __init__(self, local_sparsity: float = 0.0):
        if not 0 <= local_sparsity < 1:
            raise ConfigError(f"strategy.client.local_sparsity={local_sparsity}: allowed: a number in [0, 1)")
        self.local_sparsity = local_sparsity

    def load(self, model: nn.Module, arrays: ArrayRecord, task: ClientTask) -> nn.Module:
        """Decode the pruned global model, prune ``local_sparsity`` more by magnitude, and keep the
        client's masks (global ∧ local) in ``task.received``."""
        tensors, masks = sparse_decode(arrays, model.state_dict())
        for name, t in tensors.items():
            kept = int(masks[name].sum())
            if self.local_sparsity > 0 and t.dim() >= 2 and kept:
                keep_total = (1 - self.local_sparsity) * kept
                masks[name] = masks[name] & magnitude_mask(t * masks[name], 1 - keep_total / t.numel())
            tensors[name] = t * masks[name]
        model.load_state_dict(tensors)
        task.received["masks"] = masks
        return model

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        masks = task.received["masks"]
        loss = masked_sgd(model, masks, task)
        state = model.state_dict()
        task.state.save(PERSONAL, state)
        upload_layers = set(task.config["upload"])
        upload = {n: t for n, t in state.items() if layer_of(n) in upload_layers}
        return sparse_encode(upload, masks), {"train_loss": loss, "density": density(masks)}

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """The subnetwork this client last trained; a client never sampled fine-tunes the dense
        global model for one local pass and keeps nothing."""
        stored = task.state.load(PERSONAL)
        if stored is None:
            local_sgd(model, task, epochs=1)
        else:
            model.load_state_dict(stored)
        return model


def density(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / max(sum(m.numel() for m in masks.values()), 1)


def masked_sgd(model: nn.Module, masks: dict[str, torch.Tensor], task: ClientTask) -> float:
    """Local SGD in which pruned weights stay zero: the mask is re-applied after every step."""
    named = dict(model.named_parameters())
    hooks = [named[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items() if n in named]
    try:
        return local_sgd(model, task)
    finally:
        for h in hooks:
            h.remove()
