"""PEFT prompt tuning of a Hugging Face decoder (octomil_sim.models.HFCausalLM), built offline."""

import copy

import pytest
import torch

from helpers import one_example_task
from octomil_sim.errors import ConfigError
from octomil_sim.models import HFCausalLM
from octomil_sim.training import evaluate, sgd_epochs


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_only_the_prompt_trains_travels_and_is_stored(architecture):
    torch.manual_seed(0)
    model = HFCausalLM((6,), 3, architecture=architecture, vocab_size=10, d_model=16, num_heads=2, prompt_length=5)
    state = model.state_dict()
    assert list(state) == ["lm.prompt_encoder.default.embedding.weight"] and state[list(state)[0]].shape == (5, 16)
    x, y = torch.randint(0, 10, (8, 6)), torch.randint(0, 3, (8,))
    assert model(x).shape == (8, 3)
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    prompt = state[list(state)[0]].clone()
    sgd_epochs(model, x, y, epochs=3, batch_size=4, lr=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.state_dict()[list(state)[0]], prompt)  # the prompt moved
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)  # the base did not
    assert not model.lm.base_model.training  # no dropout in the base, even in train mode

    inside = torch.nn.Sequential(model)  # the base stays out of a parent's state dict too
    assert list(inside.state_dict()) == ["0.lm.prompt_encoder.default.embedding.weight"]
    inside.load_state_dict(inside.state_dict())  # and loads back through the parent, strictly
    with pytest.raises(RuntimeError, match="Missing key"):
        torch.nn.Sequential(model, torch.nn.Linear(2, 2)).load_state_dict({"0." + k: v for k, v in state.items()})
    twin = copy.deepcopy(model)  # shares the frozen base, owns its prompt
    assert all((p is q) != p.requires_grad for p, q in zip(model.parameters(), twin.parameters()))
    other = HFCausalLM((6,), 3, architecture=architecture, vocab_size=10, d_model=16, num_heads=2, prompt_length=5)
    other.load_state_dict(model.state_dict())  # the same base in every process: the prompt is all it needs
    assert torch.allclose(other(x), model(x)) and torch.allclose(copy.deepcopy(model)(x), model(x))
    with pytest.raises(RuntimeError, match="missing"):
        other.load_state_dict({})


@pytest.mark.parametrize("strategy", ["pfedme", "perfedavg", "scafflix", "fedp3"])
def test_strategies_that_write_every_parameter_refuse_a_frozen_base(make_spec, strategy):
    from octomil_sim.config import validate

    with pytest.raises(ConfigError, match=f"model=hf_causal_lm: its base is frozen, and strategy={strategy}'s update"):
        validate(make_spec("dataset=synthetic_tokens", "model=hf_causal_lm", f"strategy={strategy}",
                           "model.net.d_model=16", "model.net.num_heads=2"))


def test_label_tokens_are_checked():
    with pytest.raises(ConfigError, match="model.net.label_tokens=\\[1\\]: allowed: null or 3 token ids"):
        HFCausalLM((6,), 3, vocab_size=10, d_model=16, num_heads=2, label_tokens=[1])
    with pytest.raises(ConfigError, match="architecture='bert'"):
        HFCausalLM((6,), 3, architecture="bert")


def test_pretraining_the_tiny_base_is_cached_and_teaches_the_task(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTOMIL_SIM_CACHE", str(tmp_path))
    options = dict(vocab_size=16, d_model=16, num_heads=2, prompt_length=2, pretrain_steps=150, pretrain_lr=1e-2,
                   pretrain_source="octomil_sim.data.synthetic_tokens",
                   pretrain_kwargs=dict(num_clients=40, seq_len=8, vocab_size=16, num_classes=2, signal=0.6, seed=1))
    from octomil_sim.data import synthetic_tokens

    rows = synthetic_tokens(num_clients=5, seq_len=8, vocab_size=16, num_classes=2, signal=0.6, seed=2)
    x, y = torch.tensor(rows["x"]), torch.tensor(rows["y"])
    trained = HFCausalLM((8,), 2, **options)
    assert len(list(tmp_path.rglob("hf_base-*.safetensors"))) == 1
    cached = HFCausalLM((8,), 2, **options)  # loads the cached base
    assert all(torch.equal(p, q) for p, q in zip(trained.lm.base_model.parameters(), cached.lm.base_model.parameters()))
    fresh = HFCausalLM((8,), 2, **{**options, "pretrain_steps": 0})
    assert evaluate(trained, x, y)[1] > max(0.75, evaluate(fresh, x, y)[1] + 0.15)


def test_ditto_trains_a_personal_prompt_with_a_frozen_base():
    """Ditto's lambda-selecting personal steps skip parameters the model freezes."""
    from octomil_sim.client_data import ClientData
    from strategies.ditto import DittoClient

    torch.manual_seed(0)
    model = HFCausalLM((6,), 2, vocab_size=10, d_model=16, num_heads=2, prompt_length=3)
    task = one_example_task(lr=0.5)
    x, y = torch.randint(0, 10, (30, 6)), torch.randint(0, 2, (30,))
    task.data = ClientData(x, y, x, y)
    upload, metrics = DittoClient(lam=[0.1, 1.0], val_fraction=0.2).train(model, task)
    assert list(upload) == ["lm.prompt_encoder.default.embedding.weight"]
    assert "lm.prompt_encoder.default.embedding.weight" in task.state.load("ditto_v")


@pytest.mark.slow
def test_a_prompt_tuning_run_sends_only_the_prompt(make_spec, tmp_path):
    from octomil_sim.runner import run

    out = run(make_spec("dataset=synthetic_tokens", "model=hf_causal_lm", "strategy=ditto", "model.net.prompt_length=4",
                        "model.net.d_model=16", "model.net.num_heads=2", "simulation.num_clients=6",
                        "simulation.clients_per_round=3", "simulation.rounds=2", "progress=false"), tmp_path / "run")
    per_client = [r["bytes_up"] / 3 for r in out["rounds"]]
    assert all(4 * 16 * 4 <= b < 4 * 16 * 4 + 400 for b in per_client)  # 4 x 16 float32 and the record's framing
    assert out["system"]["failed_rounds"] == 0
