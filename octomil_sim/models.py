"""Models, built from ``conf/model/*.yaml`` with the dataset's input shape and class count."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn


class MLR(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input (pFedMe's MLR)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network; ``hidden`` lists the hidden widths."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200,)):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST CNN (arXiv 1812.01097): two 5x5 conv + 2x2 max-pool blocks (32, 64 channels),
    a 2048-unit dense layer and the classifier."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 62):
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Linear(64 * (height // 4) * (width // 4), 2048), nn.ReLU())
        self.head = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x).flatten(1)))


class PromptTransformer(nn.Module):
    """A frozen transformer encoder with a trainable soft prompt and classifier head (prompt tuning,
    Lester et al. arXiv 2104.08691; per-client prompts as in pFedPrompt / FedPrompt).

    ``prompt`` (``prompt_length`` x d_model) is prepended to the token embeddings; the mean of the
    encoder's outputs at the prompt positions (which attend to the whole sequence, like a [CLS]
    token whose query is the client's own) feeds ``head``. ``base`` (embeddings and encoder) never trains. The base is a
    small encoder built from this config (``vocab_size``, ``d_model``, ``num_layers``, ``num_heads``),
    or, with ``hf_name``, any Hugging Face encoder loaded by name (needs ``transformers`` and the hub).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, vocab_size: int = 64, d_model: int = 32,
                 num_layers: int = 2, num_heads: int = 4, prompt_length: int = 4, hf_name: str | None = None):
        super().__init__()
        (seq_len,) = input_shape
        self.hf = hf_name is not None
        if self.hf:
            self.base = _hf_encoder(hf_name)
            d_model = self.base.config.hidden_size
        else:
            layer = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward=2 * d_model, dropout=0.0,
                                               batch_first=True)
            self.base = nn.ModuleDict({
                "embed": nn.Embedding(vocab_size, d_model),
                "position": nn.Embedding(seq_len + prompt_length, d_model),
                "encoder": nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False),
            })
        self.base.requires_grad_(False)
        self.prompt = nn.Parameter(torch.randn(prompt_length, d_model) * 0.1)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long()
        prompt = self.prompt.expand(len(tokens), -1, -1)
        if self.hf:
            embeds = torch.cat([prompt, self.base.get_input_embeddings()(tokens)], dim=1)
            hidden = self.base(inputs_embeds=embeds).last_hidden_state
        else:
            embeds = torch.cat([prompt, self.base["embed"](tokens)], dim=1)
            embeds = embeds + self.base["position"].weight[: embeds.shape[1]]
            hidden = self.base["encoder"](embeds)
        return self.head(hidden[:, : self.prompt.shape[0]].mean(dim=1))


def _hf_encoder(name: str) -> nn.Module:
    return _from_hub("AutoModel", name, "null (the built-in encoder)")


def _from_hub(auto_class: str, name: str, instead: str) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(name)``, with a one-line ``ConfigError`` naming
    ``model.net.hf_name`` when the package is missing or the model cannot be loaded."""
    from octomil_sim.errors import ConfigError

    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model.net.hf_name={name!r}: needs the transformers package; allowed: {instead}, "
                          "or pip install 'octomil-sim[hf]'") from None
    try:
        return getattr(transformers, auto_class).from_pretrained(name)
    except OSError as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"model.net.hf_name={name!r} could not be loaded ({reason}); allowed: a model id "
                          f"reachable from here or a local directory, or {instead}") from None


class HFCausalLM(nn.Module):
    """A Hugging Face decoder (GPT-2 or Llama architecture) personalized by prompt tuning through PEFT
    (Lester et al., arXiv 2104.08691; ``peft.PromptTuningConfig`` with ``num_virtual_tokens`` =
    ``prompt_length``), as a classifier: the label of a token sequence is the next token, read from
    the decoder's logits at the last position restricted to one token per class (``label_tokens``, a
    verbalizer; perplexity of the label is ``exp(loss)``).

    Only the prompt trains. The base is frozen, kept in evaluation mode (no dropout), and is not part
    of ``state_dict``: what a client receives, uploads, stores or a checkpoint keeps is the prompt
    alone (``prompt_length x hidden`` numbers), as a deployment that never ships an 8B base would.
    Every process builds the same base: from ``hf_name`` (a hub id or a local directory, e.g.
    ``meta-llama/Meta-Llama-3-8B``, needs the hub), or, offline, a tiny decoder from this config
    (``architecture``, ``d_model``, ``num_layers``, ``num_heads``) under ``torch.manual_seed(base_seed)``
    whose vocabulary is the data's tokens plus one token per class. ``label_tokens``: the class tokens
    (default: the vocabulary's last ``num_classes`` ids).

    ``pretrain_steps > 0`` (tiny model only) stands in for a pretrained LLM: the whole decoder is first
    trained as a language model (next-token loss over each sequence followed by its label token, Adam,
    batches of 64) on ``pretrain_source`` (an import path of a function returning rows ``x``, ``y``,
    called with ``pretrain_kwargs``; e.g. the token generator with another seed and clients: public
    data of the same kind as the clients'), then frozen. The result is cached on disk by its settings
    (``octomil_sim.data.cache_root``, safetensors), so every process loads the same base."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hf_name: str | None = None,
                 architecture: str = "gpt2", vocab_size: int = 64, d_model: int = 32, num_layers: int = 2,
                 num_heads: int = 4, prompt_length: int = 20, label_tokens: list[int] | None = None,
                 base_seed: int = 0, pretrain_steps: int = 0, pretrain_source: str | None = None,
                 pretrain_kwargs: dict | None = None, pretrain_lr: float = 3e-3):
        super().__init__()
        try:
            from peft import PromptTuningConfig, TaskType, get_peft_model
        except ImportError:
            from octomil_sim.errors import ConfigError

            raise ConfigError("model=hf_causal_lm: needs the peft and transformers packages; allowed: "
                              "pip install 'octomil-sim[hf]', or another model") from None
        (seq_len,) = input_shape
        base = _hf_decoder(hf_name) if hf_name else _tiny_decoder(architecture, vocab_size + num_classes,
                                                                  seq_len + prompt_length + 1, d_model,
                                                                  num_layers, num_heads, base_seed)
        if pretrain_steps and not hf_name:
            settings = dict(architecture=architecture, vocab=vocab_size + num_classes, seq_len=seq_len,
                            prompt=prompt_length, d_model=d_model, layers=num_layers, heads=num_heads, seed=base_seed,
                            steps=pretrain_steps, source=pretrain_source, kwargs=dict(pretrain_kwargs or {}),
                            lr=pretrain_lr, classes=num_classes)
            _pretrained(base, settings)
        total = base.get_input_embeddings().num_embeddings
        tokens = list(range(total - num_classes, total)) if label_tokens is None else list(label_tokens)
        if len(tokens) != num_classes or not all(isinstance(t, int) and 0 <= t < total for t in tokens):
            from octomil_sim.errors import ConfigError

            raise ConfigError(f"model.net.label_tokens={label_tokens}: allowed: null or {num_classes} token ids "
                              f"in [0, {total})")
        self.register_buffer("label_tokens", torch.tensor(tokens), persistent=False)
        with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6 (a FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            self.lm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                              num_virtual_tokens=prompt_length))
        self._trainable = {f"lm.{n}" for n, p in self.lm.named_parameters() if p.requires_grad}
        self._kept_out = set(self.state_dict()) - self._trainable  # the base's entries, before the hook drops them
        self._register_state_dict_hook(_only_trainable)  # also when this model sits inside another module
        self.register_load_state_dict_post_hook(_base_not_missing)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.base_model.eval()  # the frozen base never drops out
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=x.long()).logits[:, -1]
        return logits[:, self.label_tokens]

    def __deepcopy__(self, memo):
        """A copy whose trainable parameters (the prompt) are its own and whose frozen base is shared:
        a client's model costs a prompt, not a second base (they never change)."""
        memo.update({id(p): p for p in self.parameters() if not p.requires_grad})
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = sorted(self._trainable - set(state_dict))
        unexpected = sorted(set(state_dict) - self._trainable)
        if strict and (missing or unexpected):
            raise RuntimeError(f"HFCausalLM.load_state_dict: missing {missing}, unexpected {unexpected}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def _only_trainable(module: "HFCausalLM", state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: keep the trainable entries (the prompt), drop the frozen base's."""
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] not in module._trainable]:
        del state[key]


def _base_not_missing(module: "HFCausalLM", keys) -> None:
    """Load post-hook: the frozen base is never in a state dict, so it is not missing from one (the
    keys of the whole load are listed; only this model's base entries, under any prefix, are removed)."""
    for key in [k for k in keys.missing_keys
                if any(k == f or k.endswith("." + f) for f in module._kept_out)]:
        keys.missing_keys.remove(key)


def _pretrained(base: nn.Module, settings: dict) -> None:
    """Train ``base`` as a language model on the pretraining rows (``HFCausalLM``), or load the
    weights a previous build with the same ``settings`` cached."""
    import hashlib
    import json
    import os

    from safetensors.torch import load_file, save_file

    from octomil_sim.client_data import cache_root
    from octomil_sim.errors import ConfigError

    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root() / f"hf_base-{key}.safetensors"

    def load() -> None:
        missing, unexpected = base.load_state_dict(load_file(str(path)), strict=False)
        is_tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
        tied = {k for k in missing if k.endswith("lm_head.weight")} if is_tied else set()  # saved once
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{path}: not this model's pretrained base (missing {sorted(set(missing) - tied)}, "
                               f"unexpected {unexpected}); delete it to pretrain again")

    if path.exists():
        load()
        return
    if not settings["source"]:
        raise ConfigError("model.net.pretrain_steps > 0 needs model.net.pretrain_source; allowed: an import path "
                          "of a function returning rows x, y (e.g. octomil_sim.data.synthetic_tokens)")
    from hydra.utils import get_object

    rows = get_object(settings["source"])(**settings["kwargs"]).with_format("numpy")[:]
    x = torch.as_tensor(rows["x"], dtype=torch.long)
    y = torch.as_tensor(rows["y"], dtype=torch.long) + settings["vocab"] - settings["classes"]
    seqs = torch.cat([x, y[:, None]], dim=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        optimizer = torch.optim.Adam(base.parameters(), lr=settings["lr"])
        base.train()
        for _ in range(settings["steps"]):
            batch = seqs[torch.randint(0, len(seqs), (64,))]
            loss = base(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    base.eval()
    state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    seen, unique = set(), {}
    for k, v in state.items():  # tied tensors (GPT-2's lm_head and wte) once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(unique, str(tmp))
    try:
        os.link(tmp, path)  # the first process to finish wins; everyone then uses its file
    except FileExistsError:
        pass
    except OSError:  # no hard links on this filesystem: the last writer wins (atomic either way)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    load()


def _tiny_decoder(architecture: str, vocab: int, positions: int, d_model: int, layers: int, heads: int,
                  seed: int) -> nn.Module:
    """A small randomly initialised GPT-2 or Llama decoder built from a config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from octomil_sim.errors import ConfigError

    if architecture not in ("gpt2", "llama"):
        raise ConfigError(f"model.net.architecture={architecture!r}: allowed: gpt2, llama")
    hf_logging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "gpt2":
            config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d_model, n_layer=layers, n_head=heads,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                eos_token_id=None)
            return GPT2LMHeadModel(config)
        config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=positions, bos_token_id=None, eos_token_id=None)
        return LlamaForCausalLM(config)


def _hf_decoder(name: str) -> nn.Module:
    return _from_hub("AutoModelForCausalLM", name, "null (a tiny model built offline)")
