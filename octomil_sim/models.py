"""Models, built from ``conf/model/*.yaml`` with the dataset's input shape and class count."""

from __future__ import annotations

import math

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
    from octomil_sim.errors import ConfigError

    try:
        from transformers import AutoModel
    except ImportError:
        raise ConfigError(f"model.net.hf_name={name!r}: needs the transformers package; allowed: null "
                          "(the built-in encoder), or pip install transformers") from None
    try:
        return AutoModel.from_pretrained(name)
    except OSError as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"model.net.hf_name={name!r} could not be loaded ({reason}); allowed: a model id "
                          "reachable from here or a local directory") from None
