"""Every config composes and instantiates; bad input fails in one line naming key and allowed values."""

import json
import subprocess
import sys

import pytest

from octomil_sim.client_app import ClientAlgorithm, build_model
from octomil_sim.config import GROUPS, check_group_choices, group_options, validate
from octomil_sim.errors import ConfigError
from octomil_sim.runner import strategy_kwargs

STRATEGIES = ("bounded_group_loss, ditto, fedavg, fedp3, finetune, hierarchical, maxfl, multitask, perfedavg, "
              "personal_layers, pfedme, prompt_tuning, qffl, scafflix, tilted")
TOKENS = ["dataset=synthetic_tokens", "model=prompt_transformer"]
NEEDS = {"femnist_cnn": ["dataset=mnist5k", "partition=iid"], "personal_layers": ["model=mlp"],
         "synthetic_tokens": TOKENS, "prompt_transformer": TOKENS, "prompt_tuning": TOKENS,
         "hf_causal_lm": ["dataset=synthetic_tokens", "model.net.d_model=16", "model.net.num_heads=2"],
         "digits_groups": ["partition=natural_id"], "multitask": ["model=mlp"]}
GROUPED = ("bounded_group_loss", "hierarchical", "multitask")  # need a groups file
DATASET_SHAPES = {"digits_groups": (64,), "synthetic": (60,), "synthetic_pfedme": (60,), "digits": (64,), "mnist5k": (1, 28, 28), "femnist": (1, 28, 28),
                  "synthetic_tokens": (16,)}


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_composes_and_instantiates(make_spec, group, tmp_path):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({str(k): "ab"[k % 2] for k in range(100)}))
    for option in group_options(group):
        extra = [f"groups_file={groups}"] if option in GROUPED else []
        cfg = make_spec(f"{group}={option}", *NEEDS.get(option, []), *extra)
        validate(cfg)
        import torch

        model = build_model(cfg)
        x = torch.zeros(2, *DATASET_SHAPES[cfg.dataset.name])
        assert model(x).shape == (2, cfg.dataset.num_classes)
        assert isinstance(cfg.strategy.client.build(), ClientAlgorithm)
        strategy = cfg.strategy.server.build(**strategy_kwargs(cfg))
        assert hasattr(strategy, "start")


def test_experiments_compose(make_spec):
    options = group_options("experiment")
    assert {"pfedme_synthetic", "ditto_synthetic", "scafflix_synthetic", "scafflix_femnist"} <= set(options)
    for option in options:
        cfg = make_spec(f"experiment={option}")
        validate(cfg)
        # named <strategy>_<data> or, for a paper's table cell, <paper>_<table>_<data>_<model>_<strategy>;
        # TERM's paper names the tilted strategy
        first = {"term": "tilted", "quickstart": "finetune"}.get(option.split("_")[0], option.split("_")[0])
        assert cfg.strategy.name in (first, option.split("_")[-1])


def test_bad_alpha_from_the_command_line(make_spec):
    with pytest.raises(ConfigError, match=r"strategy.client.alpha=2.0: allowed: a number in \(0, 1\]"):
        validate(make_spec("experiment=scafflix_synthetic", "strategy.client.alpha=2.0"))


def test_default_is_the_documented_experiment(make_spec):
    cfg = make_spec()
    assert (cfg.dataset.name, cfg.strategy.name, cfg.simulation.num_clients) == ("synthetic", "finetune", 100)
    assert (cfg.dataset.source.get('alpha'), cfg.dataset.source.get('beta')) == (0.5, 0.5)


def test_image_model_on_tabular_data(make_spec):
    with pytest.raises(ConfigError, match="dataset='synthetic': allowed: model=femnist_cnn needs 3-d inputs"):
        validate(make_spec("model=femnist_cnn"))


def test_unknown_group_choice():
    with pytest.raises(ConfigError) as err:
        check_group_choices(["strategy=nope"])
    assert str(err.value) == f"strategy='nope' is not a known strategy; allowed: {STRATEGIES}"
    with pytest.raises(ConfigError, match=r"partition='bogus'"):
        check_group_choices(["partition=iid,bogus"])  # multirun sweep list
    check_group_choices(["strategy=fedavg,finetune", "simulation.lr=0.1", "experiment=null"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("simulation.lr=-0.1", "simulation.lr=-0.1: allowed: a number > 0"),
        ("simulation.clients_per_round=500", "simulation.clients_per_round=500: allowed: an integer in 1..simulation.num_clients (100)"),
        ("simulation.rounds=0", "simulation.rounds=0: allowed: an integer >= 1"),
        ("simulation.test_fraction=1.5", "simulation.test_fraction=1.5: allowed: a number in (0, 1)"),
    ],
)
def test_bad_values(make_spec, override, expected):
    with pytest.raises(ConfigError) as err:
        validate(make_spec(override))
    assert str(err.value) == expected


@pytest.mark.parametrize(
    "args, expected",
    [
        (["strategy=nope"], "error: strategy='nope' is not a known strategy; allowed: " + STRATEGIES),
        (["simulation.lr=-1"], "error: simulation.lr=-1: allowed: a number > 0"),
        (["dataset=femnist", "dataset.source.path=/nonexistent/femnist"], "error: dataset.source.path='/nonexistent/femnist' could not be loaded"),
        (["strategy=fedp3", "strategy.server.global_keep=1.5"],  # a server-half check, before Ray starts
         "error: strategy.server.global_keep=1.5: allowed: a number in (0, 1]"),
        (["system=heterogeneous", "system.classes.low.dropout=2"], "error: system.classes.low.dropout=2: allowed"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, expected):
    proc = subprocess.run([sys.executable, "-m", "octomil_sim", *args, f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr


def test_wheel_ships_every_config(tmp_path):
    """``python -m octomil_sim`` from an installed wheel finds the same Hydra configs as a checkout."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(root), "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {f"octomil_sim/conf/{p.relative_to(root / 'conf').as_posix()}" for p in (root / "conf").rglob("*.yaml")}
    assert expected and shipped == expected
