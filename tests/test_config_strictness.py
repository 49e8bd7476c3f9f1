"""Overrides that add a key no config declares and no component accepts are errors that name the
closest valid key (issue 11: ``+simulaton.rounds=3`` used to run 100 rounds, ``+head_epochs=1`` was
ignored)."""

import subprocess
import sys

import pytest

from octomil_sim.config import check_added_keys, closest_key, target_parameters
from octomil_sim.errors import ConfigError


@pytest.mark.parametrize("override, hint", [
    ("+simulaton.rounds=3", "simulation.rounds"),
    ("+head_epochs=1", "strategy.client.head_epochs"),
    ("+simulation.round=3", "simulation.rounds"),
    ("+strategy.client.lamda=2", "strategy.client.lam"),
    ("+strategy.client.lr=2", "simulation.lr"),  # FedAvgClient takes no arguments (object.__init__ is no catch-all)
])
def test_unread_added_key_names_the_closest(make_cfg, override, hint):
    extra = (["strategy=personal_layers", "model=mlp"] if "head" in override else
             ["strategy=fedavg"] if "client.lr" in override else ["strategy=ditto"])
    cfg = make_cfg(*extra, override)
    with pytest.raises(ConfigError) as err:
        check_added_keys(cfg, [*extra, override])
    key = override.lstrip("+").split("=")[0]
    assert str(err.value) == (f"{override}: no config or component reads {key}; did you mean {hint}? "
                              "(+ adds a new key; change an existing one without +)")


@pytest.mark.parametrize("overrides", [
    ["strategy=tilted", "+strategy.server.fraction_train=0.5"],  # Flower's FedAvg argument, through **kwargs
    ["strategy=ditto", "+strategy.client.val_fraction=0.2"],  # declared already: ++ form below
    ["strategy=maxfl", "~strategy.server.eta_g"],  # a removal is not an addition
    ["+model.tokens=false"],  # read with a default by the runtime
    ["strategy=fedavg", "simulation.rounds=3"],
    ["++simulation.rounds=3", "++progress=false"],  # ++ adds or overrides: taken as intended
])
def test_keys_a_component_reads_are_accepted(make_cfg, overrides):
    if overrides[-1] == "+strategy.client.val_fraction=0.2":
        overrides = [overrides[0], "++strategy.client.val_fraction=0.2"]
    check_added_keys(make_cfg(*overrides), overrides)


def test_target_parameters_follow_kwargs_through_the_mro():
    params = target_parameters("strategies.tilted.TiltedFedAvg")
    assert {"t", "server_lr", "normalizer_rate", "seed", "sampling", "fraction_train", "min_available_nodes"} <= params
    assert "lam" not in params
    assert target_parameters("strategies.ditto.DittoClient") == {"lam", "personal_epochs", "personal_lr", "val_fraction"}


def test_closest_key_prefers_the_same_last_name():
    keys = {"simulation.rounds", "strategy.client.head_epochs", "strategy.client.head_finetune_epochs", "seed"}
    assert closest_key("head_epochs", keys) == "strategy.client.head_epochs"
    assert closest_key("zzz", keys) is None


def test_cli_typo_is_one_line_before_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "octomil_sim", "+simulaton.rounds=3", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: +simulaton.rounds=3: no config or component reads simulaton.rounds; did you mean "
                      "simulation.rounds? (+ adds a new key; change an existing one without +)"], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "results.json").exists()
