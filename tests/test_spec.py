"""The typed run spec: built once at the edge, checked in one line, and the only thing the runtime takes."""

import pickle
import re
from pathlib import Path

import pytest

from octomil_sim.errors import ConfigError
from octomil_sim.spec import Component, RunSpec

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_config_becomes_typed_parts(make_cfg):
    spec = RunSpec.from_config(make_cfg())
    assert (spec.strategy.name, spec.dataset.name, spec.partition.name) == ("finetune", "synthetic", "natural_id")
    assert spec.dataset.input_shape == (60,) and isinstance(spec.dataset.input_shape, tuple)
    assert spec.simulation.rounds == 100 and spec.simulation.local_steps is None
    assert spec.dataset.source.get("num_clients") == 100  # ${simulation.num_clients} resolved
    assert spec.strategy.client.target == "strategies.finetune.FineTuneClient"
    assert spec.fairness.policy is None and spec.name == "finetune on synthetic"
    composed = RunSpec.from_config(make_cfg("personalization=ditto", "fairness=tilted"))
    assert composed.name == "ditto + tilted on synthetic"
    assert composed.policy.build().t == 1.0


def test_a_key_no_part_reads_is_one_line_naming_the_closest(make_cfg):
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(make_cfg(), resolve=True)
    tree["simulation"]["rouns"] = 3
    with pytest.raises(ConfigError, match=r"^simulation.rouns: no part of octomil-sim reads this key; did you mean "
                                          r"simulation.rounds\? \(allowed under simulation: .*\)$"):
        RunSpec.from_config(tree)
    del tree["simulation"]["rouns"], tree["simulation"]["lr"]
    with pytest.raises(ConfigError, match=r"^simulation.lr: missing"):
        RunSpec.from_config(tree)
    tree["simulation"]["lr"] = 0.1
    tree["strategy"]["client"] = "ditto"
    with pytest.raises(ConfigError, match=r"^strategy.client='ditto': allowed: a mapping with a _target_"):
        RunSpec.from_config(tree)


def test_equal_configs_give_equal_hashable_picklable_specs(make_cfg):
    a, b = RunSpec.from_config(make_cfg("strategy=ditto")), RunSpec.from_config(make_cfg("strategy=ditto"))
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert pickle.loads(pickle.dumps(a)) == a  # what travels to the Ray actors with the ClientApp
    c = RunSpec.from_config(make_cfg("strategy=ditto", "strategy.client.lam=2.0"))
    assert c != a and c.key != a.key
    assert c.strategy.client.get("lam") == 2.0


def test_replace_resolves_again_as_a_command_line_override_does(make_cfg):
    spec = RunSpec.from_config(make_cfg("strategy=ditto"))
    moved = spec.replace(simulation={"state_dir": "/x/client_state", "seed": 3, "lr": 0.1})
    assert (moved.simulation.state_dir, moved.simulation.seed) == ("/x/client_state", 3)
    assert moved.dataset.source.get("seed") == 3  # ${simulation.seed}: the data follows
    assert moved.strategy.client.get("personal_lr") == 0.1  # ${simulation.lr}
    assert moved.config["simulation"]["state_dir"] == "/x/client_state" and moved.config["dataset"]["source"]["seed"] == 3
    assert moved == RunSpec.from_config(make_cfg("strategy=ditto", "simulation.state_dir=/x/client_state",
                                                 "simulation.seed=3", "simulation.lr=0.1"))
    assert spec.simulation.seed == 0 and spec.config["simulation"]["seed"] == 0  # the original stays
    moved.check()


def test_a_spec_whose_fields_and_record_disagree_does_not_run(make_cfg, tmp_path):
    import dataclasses

    from octomil_sim.runner import run

    spec = RunSpec.from_config(make_cfg())
    by_hand = dataclasses.replace(spec, simulation=dataclasses.replace(spec.simulation, lr=0.5))
    with pytest.raises(ConfigError, match="its typed parts and its record \\(config\\) disagree"):
        run(by_hand, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_keys_hash_mixed_mapping_keys(make_cfg):
    spec = RunSpec.from_config(make_cfg())
    odd = spec.replace(system={"classes": {0: {"share": 0.5}, "fast": {"share": 0.5}}})
    assert hash(odd) == hash(spec.replace(system={"classes": {0: {"share": 0.5}, "fast": {"share": 0.5}}}))
    assert odd != spec


def test_a_component_builds_with_extra_arguments():
    made = Component("octomil_sim.models.MLR", {}).build(input_shape=(4,), num_classes=3)
    assert tuple(made.fc.weight.shape) == (3, 4)


def test_run_takes_a_spec_not_the_raw_config(make_cfg, tmp_path):
    from octomil_sim.runner import run

    with pytest.raises(TypeError, match="run\\(\\) takes a RunSpec"):
        run(make_cfg(), tmp_path)


RUNTIME = ["data.py", "client_app.py", "runner.py", "server_app.py", "system.py", "loggers.py", "training.py",
           "checkpoint.py", "state.py", "metrics.py", "batching.py"]


@pytest.mark.parametrize("module", RUNTIME + [f"../strategies/{p.name}" for p in sorted((ROOT / "strategies").glob("*.py"))])
def test_the_runtime_never_sees_the_hydra_config(module):
    """Configuration at the edge (STYLE.md): only the front ends (``__main__``, ``cli``, ``api``), the
    config checks and ``spec`` touch OmegaConf; the runtime, the ClientApp and the strategies take the spec."""
    source = (ROOT / "octomil_sim" / module).read_text()
    assert not re.search(r"\b(DictConfig|OmegaConf|omegaconf)\b", source), module
