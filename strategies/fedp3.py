"""FedP3 (Yi, Gazagnadou, Richtárik, Lyu; arXiv 2404.09816, Algorithm 1): federated personalized and
privacy-friendly network pruning under model heterogeneity. Official code: SonyResearch/FedP3
(``main.py`` round loop, ``models/distributed_training_utils.py`` Client/Server, ``utils/options.py``).

A round, function by function:

- Layer assignment (which layers client i sends back; the paper's L_i, Algorithm 1's upload step):
  ``uploaded_layers``. As ``main.py`` does for OPU2/OPU3 (and LowerB): the non-final layers are
  split into consecutive client-id blocks, client i starts at layer ``i * (L-1) // N`` (official:
  ``int(client.id / 25)`` for 100 clients and 4 non-final layers) and takes ``upload_layers``
  consecutive layers from there, wrapping around the non-final ones; the final layer is always
  added (``w_final_keys``). ``upload_layers`` = 1, 2, 3 is LowerB, OPU2, OPU3; null: every layer.
- Server-side global pruning (Algorithm 1's global pruning; ``Client.synchronize_with_server`` +
  ``Client.sparsity``): ``global_masks``. Only the layers the client does NOT upload are pruned, by
  magnitude, each weight tensor keeping its ``int(global_keep * numel)`` largest entries
  (``magnitude_mask``; official ``--global_prune`` = 0.9 is this share kept); biases stay dense;
  the layers the client uploads go down dense. ``global_keep`` can be one number per resource class
  of ``system`` (per-device sparsity). The pruned model is sent sparse-coded (``sparse_encode``).
- Client-side local pruning (Algorithm 1's local pruning; the README's ``fixed|uniform|od``):
  ``local_sparsity_draw`` + ``local_mask``, on the layers the client keeps home only.
- Local training: ``masked_sgd`` (all uploaded entries train; pruned ones stay zero).
- Upload: the assigned layers, dense (``FedP3Client.train``).
- Aggregation (``Server.aggregate_weight_updates_subset``): ``client_weights`` + ``masked_average``,
  per layer over the clients that uploaded it: ``mean`` (official default ``--aggregation mean``,
  not weighted by examples) or ``weighted_mean`` (weights proportional to the number of layers each
  client uploaded); a layer nobody uploaded keeps its value.
- Personalized model: the client keeps its own final layer between rounds (official: the final
  layer is not in ``w_glob_keys``, so ``synchronize_with_server`` never overwrites it) and its last
  trained network is its deployed model (``FedP3Client.personalize``; official ``Client.evaluate``).

Why pruned entries now train: before, every layer was pruned and masks were enforced on upload, so
clients of equal sparsity shared one magnitude mask and the entries it dropped were never trained by
anyone. As in the official code, the layers a client uploads reach it dense and every entry of them
trains; pruning only shapes the layers it keeps home.

Deliberate differences from the official code:
- Pruned entries of kept-home layers stay zero during local training (masked SGD); the official
  code zeroes them on download but then trains them like any other weight, so the device never
  really runs a smaller network.
- ``weighted_mean`` normalizes each layer's weights to sum to one (the official code divides the
  layer counts by the number of uploaders, so the weights sum to the layer count, and its
  ``[:, None, None, None]`` broadcast fits 4-d kernels only).
- Layer block of client i: ``i * (L-1) // N`` generalizes the hard-coded ``int(client.id / 25)``
  (100 clients, 5-layer networks); the two agree there and for EMNIST's 3-layer net, where OPU2/OPU3
  upload every layer as in the official code.
- Partial participation (official: every client every round; a README "future work"): a client
  sampled for the first time starts from the server's current final layer.
- The server still sends the final layer (it cannot know whether the client kept its own), so
  bytes down count it; the client then uses its own from its second round on.
- Magnitude ties go to the lower index (``torch.topk`` leaves them unspecified); "bias" means a 1-d
  tensor rather than a name containing "bias".
- Local pruning (``fixed|uniform|od``) is advertised in the official README but ``utils/options.py``
  has no ``--pruning`` flag and no code for it; the definitions here are ours: ``fixed`` prunes
  ``local_sparsity`` every round, ``uniform`` draws the round's sparsity from U[0, local_sparsity],
  ``od`` (ordered dropout, FjORD arXiv 2102.13673) draws it the same way and drops the trailing
  output units (rows and their biases) instead of the smallest weights.
- OPR2 (random layers per round, in ``main.py`` but crashing there for lack of ``w_final_keys``)
  is not offered.
"""

from __future__ import annotations

import math

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
AGGREGATIONS = ("mean", "weighted_mean")
LOCAL_PRUNING = ("fixed", "uniform", "od")


# --- update math ---------------------------------------------------------------------------------
def layer_of(name: str) -> str:
    """A parameter's layer: its module path (``body.0.weight`` -> ``body.0``)."""
    return name.rsplit(".", 1)[0]


def layers_in_order(names) -> list[str]:
    """The layers of a state dict in model order (the last one is the final layer)."""
    return list(dict.fromkeys(layer_of(n) for n in names))


def uploaded_layers(client: int, num_clients: int, layers: list[str], upload_layers: int | None) -> list[str]:
    """L_i: ``upload_layers`` consecutive non-final layers from block ``client * (L-1) // N``
    (wrapping around), plus the final layer; all layers when ``upload_layers`` is None."""
    body = layers[:-1]
    if upload_layers is None or not body:
        return list(layers)
    first = client * len(body) // num_clients
    picked = {(first + j) % len(body) for j in range(upload_layers)}
    return [body[i] for i in sorted(picked)] + [layers[-1]]


def magnitude_mask(tensor: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the ``int(keep * numel)`` entries of largest magnitude (official ``Client.sparsity``;
    ties: lower index); 1-d tensors (biases) are kept whole."""
    if tensor.dim() < 2 or keep >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    flat = tensor.detach().abs().flatten()
    order = torch.from_numpy(np.argsort(-flat.numpy(), kind="stable"))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[: int(keep * flat.numel())]] = True
    return mask.reshape(tensor.shape)


def global_masks(state: Tensors, upload: list[str], keep: float) -> dict[str, torch.Tensor]:
    """Server-side pruning for one client: ``magnitude_mask(keep)`` on the layers it does not
    upload, dense on the layers it does."""
    up = set(upload)
    return {n: torch.ones_like(t, dtype=torch.bool) if layer_of(n) in up else magnitude_mask(t, keep)
            for n, t in state.items()}


def local_sparsity_draw(strategy: str, local_sparsity: float, rng: np.random.Generator) -> float:
    """This round's client-side sparsity: ``local_sparsity`` (fixed) or U[0, local_sparsity]
    (uniform, od)."""
    return local_sparsity if strategy == "fixed" else float(rng.uniform(0.0, local_sparsity))


def local_mask(tensor: torch.Tensor, received: torch.Tensor, strategy: str, sparsity: float) -> torch.Tensor:
    """Client-side pruning of one tensor on top of the ``received`` mask. fixed/uniform: keep the
    ``int((1 - sparsity) * kept)`` largest received entries (biases whole); od: keep the first
    ``ceil((1 - sparsity) * rows)`` output units (rows of a weight, entries of a bias)."""
    if sparsity <= 0:
        return received
    if strategy == "od":
        rows = tensor.shape[0]
        lead = torch.zeros(rows, dtype=torch.bool)
        lead[: math.ceil((1 - sparsity) * rows)] = True
        return received & lead.reshape(-1, *([1] * (tensor.dim() - 1))).expand_as(tensor)
    kept = int(received.sum())
    if tensor.dim() < 2 or kept == 0:
        return received
    return received & magnitude_mask(tensor * received, int((1 - sparsity) * kept) / tensor.numel())


def client_weights(layer_counts: list[int], aggregation: str) -> list[float]:
    """Each uploader's weight for one layer: 1 (mean) or the number of layers it uploaded
    (weighted_mean); ``masked_average`` normalizes them."""
    return [1.0 if aggregation == "mean" else float(c) for c in layer_counts]


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
            out[name + BITS] = torch.from_numpy(np.packbits(m.flatten().cpu().numpy()))
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


# --- server half ---------------------------------------------------------------------------------
class FedP3(FedAvg):
    """``global_keep``: share of each pruned weight tensor the server keeps, one number in (0, 1] or
    ``{resource class: share}`` over the classes of ``system``; ``upload_layers``: non-final layers
    each client uploads (1 LowerB, 2 OPU2, 3 OPU3; null: all); ``aggregation``: mean | weighted_mean."""

    uploads_differ = True  # each client uploads its own layers (client-level DP needs one shape of upload)

    def __init__(self, global_keep: float | dict = 0.9, upload_layers: int | None = 2, aggregation: str = "mean",
                 system: dict | None = None, num_clients: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.system = SystemModel.build(system, self.seed, num_clients)
        names, given = [c.name for c in self.system.classes], global_keep
        if isinstance(global_keep, (int, float)):
            global_keep = {n: float(global_keep) for n in names}
        global_keep = dict(global_keep)
        if set(global_keep) != set(names) or not all(0 < k <= 1 for k in global_keep.values()):
            raise ConfigError(f"strategy.server.global_keep={given}: allowed: a number in (0, 1], "
                              f"or one for each resource class of system ({', '.join(names)})")
        if upload_layers is not None and (not isinstance(upload_layers, int) or upload_layers < 1):
            raise ConfigError(f"strategy.server.upload_layers={upload_layers}: allowed: null or an integer >= 1")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"strategy.server.aggregation={aggregation}: allowed: {', '.join(AGGREGATIONS)}")
        self.global_keep, self.upload_layers, self.aggregation = global_keep, upload_layers, aggregation
        self.num_clients = num_clients

    def keep(self, client: int) -> float:
        return self.global_keep[self.system.of(client).name]

    def plan(self, client: int, state: Tensors) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The layers ``client`` uploads and the server's masks for what it sends down."""
        upload = uploaded_layers(client, self.num_clients, layers_in_order(state), self.upload_layers)
        return upload, global_masks(state, upload, self.keep(client))

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        state = arrays.to_torch_state_dict()
        out = []
        for m in messages:
            client = m.metadata.dst_node_id
            upload, masks = self.plan(client, state)
            pruned = {n: t * masks[n] for n, t in state.items()}
            cfg = ConfigRecord({**dict(m.content[self.configrecord_key]), "upload": upload})
            content = RecordDict({self.arrayrecord_key: ArrayRecord(sparse_encode(pruned, masks)),
                                  self.configrecord_key: cfg})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=client))
        return out

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(self.aggregated_replies(replies), is_train=True, validate=False)
        if not valid or self.sent is None:
            return None, None
        previous = self.sent.to_torch_state_dict()
        decoded = [sparse_decode(r.content[self.arrayrecord_key], previous) for r in valid]
        counts = [len(layers_in_order(t)) for t, _ in decoded]
        contents = [r.content for r in valid]
        weights, lr = client_weights(counts, self.aggregation), 1.0
        if self.fairness is not None:  # the policy's weights in place of mean / weighted_mean's
            weights, lr = self.fair_weights(server_round, contents, weights, lambda: [
                float(sum((((t[n] - previous[n]) * m[n]).double() ** 2).sum() for n in t)) for t, m in decoded])
            if lr == 0:
                weights = [1.0] * len(weights)
        merged = {}
        for name, prev in previous.items():
            got = [(t[name], m[name], w) for (t, m), w in zip(decoded, weights) if name in t]
            merged[name] = masked_average(*map(list, zip(*got)), prev) if got else prev
        arrays = self.step_toward(ArrayRecord(merged), lr) if self.fairness is not None else ArrayRecord(merged)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


# --- client half ---------------------------------------------------------------------------------
class FedP3Client(ClientAlgorithm):
    """``local_pruning``: fixed | uniform | od; ``local_sparsity``: the share of the received weights
    of its kept-home layers the client prunes away itself (at most, for uniform and od)."""

    frozen_parameters_ok = False  # its update writes every parameter (a frozen base would move or fail)

    def __init__(self, local_pruning: str = "fixed", local_sparsity: float = 0.0):
        if local_pruning not in LOCAL_PRUNING:
            raise ConfigError(f"strategy.client.local_pruning={local_pruning}: allowed: {', '.join(LOCAL_PRUNING)}")
        if not 0 <= local_sparsity < 1:
            raise ConfigError(f"strategy.client.local_sparsity={local_sparsity}: allowed: a number in [0, 1)")
        self.local_pruning, self.local_sparsity = local_pruning, local_sparsity

    def load(self, model: nn.Module, arrays: ArrayRecord, task: ClientTask) -> nn.Module:
        """Decode the pruned global model, take the client's own final layer if it has one, prune
        its kept-home layers further (``local_pruning``), and keep the masks in ``task.received``.
        The masks are worked out on the CPU (NumPy's stable sort: the same masks on any device) and
        then moved to the model's device."""
        device = next(model.parameters()).device
        own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tensors, masks = sparse_decode(arrays, own)
        final = layers_in_order(own)[-1]
        stored = task.state.load(PERSONAL)
        if stored is not None:
            for name in own:
                if layer_of(name) == final:
                    tensors[name], masks[name] = stored[name].cpu(), torch.ones_like(own[name], dtype=torch.bool)
        upload = set(task.config.get("upload", layers_in_order(own)))
        rng = np.random.default_rng([task.hp.seed, task.server_round, task.client_id, 83])
        sparsity = local_sparsity_draw(self.local_pruning, self.local_sparsity, rng)
        for name, t in tensors.items():
            if layer_of(name) not in upload:
                masks[name] = local_mask(t, masks[name], self.local_pruning, sparsity)
            tensors[name] = t * masks[name]
        model.load_state_dict(tensors)
        task.received["masks"] = {k: m.to(device) for k, m in masks.items()}
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
        """The network this client last trained; a client never sampled fine-tunes the dense
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
    """Local SGD in which pruned weights stay zero (their gradients are masked)."""
    named = dict(model.named_parameters())
    hooks = [named[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items() if n in named]
    try:
        return local_sgd(model, task)
    finally:
        for h in hooks:
            h.remove()
