"""The prompt-tuning model: frozen base, trainable prompt and head, built from a config or from a
Hugging Face encoder by name (here a local directory written offline, the same code path as a hub id)."""

import torch

from octomil_sim.client_app import build_model
from octomil_sim.training import sgd_epochs

TOKENS = ["dataset=synthetic_tokens", "model=prompt_transformer"]


def _train_once(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 4, (8,))
    sgd_epochs(model, x, y, epochs=1, batch_size=4, lr=0.5, generator=torch.Generator().manual_seed(0))
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_built_in_encoder_trains_only_prompt_and_head(make_spec):
    model = build_model(make_spec(*TOKENS, "model.net.prompt_length=3"))
    assert model.prompt.shape == (3, 32)
    assert model(torch.randint(0, 64, (5, 16))).shape == (5, 4)
    assert _train_once(model) == {"prompt", "head.weight", "head.bias"}


def test_hugging_face_encoder_by_name(make_spec, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(tmp_path)
    model = build_model(make_spec(*TOKENS, f"model.net.hf_name={tmp_path}"))
    assert model.prompt.shape == (4, 24)  # d_model comes from the encoder's config
    assert model(torch.randint(0, 64, (5, 16))).shape == (5, 4)
    assert _train_once(model) == {"prompt", "head.weight", "head.bias"}


def test_unloadable_hf_name_is_a_one_line_error(make_spec, tmp_path):
    import pytest

    from octomil_sim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.net.hf_name='.*nothing-here' could not be loaded"):
        build_model(make_spec(*TOKENS, f"model.net.hf_name={tmp_path / 'nothing-here'}"))
