"""Checkpoints without pickle and the resumption rules: the JSON + safetensors encoding gives back
exactly what was saved, an unreadable newest checkpoint falls back to the older one, none readable
is one error line, and a run never resumes to fewer rounds than its checkpoint (before Ray starts).
The whole-run resumptions (equal numbers, the resume line, summed wall time) are in
test_scale_and_failures.py."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from octomil_sim import runner
from octomil_sim.checkpoint import (STATE_FILE, TENSOR_FILE, checkpoint_folders, decode, encode, load_checkpoint,
                                    restore_client_state, save_checkpoint)
from octomil_sim.errors import ConfigError
from octomil_sim.spec import RunSpec


def _state(r: int) -> dict:
    """A hand-made state shaped like the runner's: global arrays, a strategy's round_state (duals,
    an averaged model, a count, a running normaliser), rows, counters keyed by client id strings."""
    g = torch.Generator().manual_seed(r)
    return {
        "round": r, "wall_time_s": 12.5 * r,
        "arrays": {"fc.weight": torch.randn(3, 2, generator=g), "fc.bias": torch.tensor([0.1, float("nan")]),
                   "emb/half": torch.randn(4, generator=g).to(torch.bfloat16), "steps": torch.tensor(7)},
        "strategy": {"mu": {"a": 0.5, "b": 0.0}, "model_average": {"fc.weight": torch.zeros(3, 2, dtype=torch.float64)},
                     "rounds_averaged": r, "log_normalizer": None, "mask": np.array([[True, False]]),
                     "sizes": np.arange(4, dtype=np.int64)},
        "rows": [{"round": i, "global_acc": 0.1 * i, "note": "x", "ok": True, "lams": [0.1, 1.0]}
                 for i in range(1, r + 1)],
        "grid": {"bytes": {"train_up": 10 * r}, "failed": {"3": 1}, "last_failure": {"3": "dropped out"}},
        "empty": {"list": [], "dict": {}},
    }


def _same(a, b) -> None:
    """Equal as saved: tensors and arrays bit for bit with their dtype, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # NaN too
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes() and a.shape == b.shape
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_encoding_round_trips_nested_state(tmp_path):
    state = _state(2)
    _same(state, decode(*encode(state)))
    save_checkpoint(tmp_path, 2, state, None)
    folder, loaded = load_checkpoint(tmp_path)
    _same(state, loaded)
    # plain JSON beside a tensor file, tensors under path-like keys; no pickle anywhere
    document = json.loads((folder / STATE_FILE).read_text())["state"]
    assert document["arrays"]["fc.weight"] == {"__tensor__": "arrays/fc.weight"}
    assert document["arrays"]["emb/half"] == {"__tensor__": "arrays/emb~1half"}
    assert document["strategy"]["mask"] == {"__ndarray__": "strategy/mask"}
    assert sorted(p.name for p in folder.iterdir()) == [STATE_FILE, TENSOR_FILE]


def test_numpy_scalars_and_shared_tensors_are_stored(tmp_path):
    # numpy scalars come back as the Python numbers they hold; one tensor under two keys (or a view of
    # another) is stored twice rather than refused by safetensors
    w = torch.arange(6.0)
    state = {"strategy": {"log_r": np.float32(0.5), "count": np.int64(3), "flag": np.bool_(True)},
             "arrays": {"a": w, "b": w, "view": w[:3]}}
    save_checkpoint(tmp_path, 1, state, None)
    _, loaded = load_checkpoint(tmp_path)
    assert loaded["strategy"] == {"log_r": 0.5, "count": 3, "flag": True}
    assert type(loaded["strategy"]["count"]) is int
    for k in ("a", "b", "view"):
        assert torch.equal(loaded["arrays"][k], state["arrays"][k])


@pytest.mark.parametrize("value, where", [
    ({"strategy": {"groups": {0: "a"}}}, r"checkpoint key strategy/groups/0: of type int"),
    ({"strategy": {"layers": ("fc",)}}, r"checkpoint value strategy/layers: of type tuple.*store a list"),
    ({"strategy": {"system": object()}}, r"checkpoint value strategy/system: of type object; allowed: tensors"),
    ({"rows": [{"__tensor__": "x"}]}, r"checkpoint key rows/0/'__tensor__'"),
])
def test_encoding_refuses_what_json_would_change_naming_the_key(tmp_path, value, where):
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path, 1, value, None)
    assert not (tmp_path / "checkpoint").exists()  # checked before anything is written


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage", [
    (TENSOR_FILE, _truncate), (STATE_FILE, _truncate), (TENSOR_FILE, _flip_last_byte),
    (STATE_FILE, lambda p: p.unlink()),
    ("client_state/0.pt", lambda p: p.unlink()),  # a snapshot that lost a client's file
    ("client_state/0.pt", _truncate),
])
def test_unreadable_latest_falls_back_to_the_older_one(tmp_path, caplog, name, damage):
    store = tmp_path / "client_state"
    store.mkdir()
    for r in (2, 4, 6):  # the store replaces a client's file the way DiskStateStore does
        (store / "0.tmp").write_text(f"round {r}")
        (store / "0.tmp").replace(store / "0.pt")
        save_checkpoint(tmp_path, r, _state(r), store)
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["round_000006", "round_000004"]  # the newest two
    damage(tmp_path / "checkpoint" / "round_000006" / name)
    with caplog.at_level(logging.WARNING, logger="octomil_sim.checkpoint"):
        folder, state = load_checkpoint(tmp_path)
    assert folder.name == "round_000004" and state["round"] == 4
    _same(_state(4), state)
    [line] = caplog.messages
    assert str(tmp_path / "checkpoint" / "round_000006" / name) in line and "falling back to" in line
    assert "\n" not in line
    restore_client_state(folder, store)
    assert (store / "0.pt").read_text() == "round 4"
    # the resumed run's next checkpoint (round 5 here) removes the unreadable later one; two are kept
    save_checkpoint(tmp_path, 5, _state(5), store)
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["round_000005", "round_000004"]


def test_no_readable_checkpoint_is_one_error_line(tmp_path):
    save_checkpoint(tmp_path, 2, _state(2), None)
    save_checkpoint(tmp_path, 4, _state(4), None)
    _truncate(tmp_path / "checkpoint" / "round_000004" / TENSOR_FILE)
    (tmp_path / "checkpoint" / "round_000002" / STATE_FILE).write_bytes(b"\x80\x04\x95")  # a pickle's first bytes
    with pytest.raises(ConfigError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"hydra.run.dir={str(tmp_path)!r}: no checkpoint in it can be read")
    assert str(tmp_path / "checkpoint" / "round_000004" / TENSOR_FILE) in message
    assert str(tmp_path / "checkpoint" / "round_000002" / STATE_FILE) in message
    assert "allowed: " in message


def test_old_pickle_checkpoints_are_named_as_such(tmp_path):
    old = tmp_path / "checkpoint" / "round_000004"
    old.mkdir(parents=True)
    (old / "state.pkl").write_bytes(b"\x80\x04\x95")
    with pytest.raises(ConfigError, match=r"state.json: missing \(state.pkl: an older octomil-sim's format"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "fresh") is None


def _checkpoint_at(make_cfg, run_dir, saved_round: int, *overrides: str) -> None:
    """A checkpoint at ``saved_round`` in ``run_dir`` whose config is what ``run`` would save for
    ``overrides`` (its state_dir resolved into the run dir)."""
    cfg = make_cfg(*overrides, f"simulation.rounds={saved_round}")
    cfg = OmegaConf.merge(cfg, {"simulation": {"state_dir": str(run_dir.resolve() / "client_state")}})
    save_checkpoint(run_dir, saved_round, {"round": saved_round, "config": OmegaConf.to_container(cfg, resolve=True),
                                           "wall_time_s": 1.0}, None)


def test_fewer_rounds_than_the_checkpoint_stop_before_ray(make_cfg, tmp_path, monkeypatch):
    _checkpoint_at(make_cfg, tmp_path, 200)

    def ray_started(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(runner, "check_data_while_ray_starts", ray_started)
    with pytest.raises(ConfigError) as err:
        runner.run(RunSpec.from_config(make_cfg("simulation.rounds=100")), tmp_path)
    assert str(err.value) == (f"simulation.rounds=100: the run dir {tmp_path} holds a checkpoint at round 200; "
                              "allowed: >= 200, or another hydra.run.dir")
    with pytest.raises(AssertionError, match="Ray started"):  # equal or more rounds go on to start Ray
        runner.run(RunSpec.from_config(make_cfg("simulation.rounds=200")), tmp_path)


@pytest.mark.slow
def test_fewer_rounds_on_the_command_line_are_one_line_and_exit_2(make_cfg, tmp_path):
    """The same refusal through ``python -m octomil_sim``: exit 2, one ``error:`` line, no traceback."""
    _checkpoint_at(make_cfg, tmp_path, 4, "simulation.num_clients=10", "simulation.clients_per_round=2")
    done = subprocess.run([sys.executable, "-m", "octomil_sim", "simulation.num_clients=10",
                           "simulation.clients_per_round=2", "simulation.rounds=3", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        f"error: simulation.rounds=3: the run dir {tmp_path} holds a checkpoint at round 4; allowed: >= 4, "
        "or another hydra.run.dir"]
    assert not (tmp_path / "results.json").exists()


NODES = ["strategy=fedavg", "simulation.num_clients=20", "simulation.clients_per_round=10", "simulation.rounds=4",
         "simulation.fraction_evaluate=0", "simulation.checkpoint_every=2", "progress=false", "simulation.backend=local"]


def _losses(results: dict) -> list:
    return [r["train_loss"] for r in results["rounds"]], results["final"]["global_loss"], results["clients"]


def test_a_resumed_run_keeps_its_checkpoints_flower_nodes(make_cfg, tmp_path, caplog):
    """Which clients share a message decides a cohort's float rounding, so a run resumed where a new
    run would have another node count (another machine, another share of the CPUs) keeps the
    checkpoint's count and ends with the uninterrupted run's numbers bit for bit."""
    spec = lambda *o: RunSpec.from_config(make_cfg(*NODES, *o))  # noqa: E731
    two = runner.run(spec("simulation.num_nodes=2"), tmp_path / "two")
    one = runner.run(spec("simulation.num_nodes=1"), tmp_path / "one")
    environment = two["runtime"].pop("environment")
    assert two["runtime"] == {"num_nodes": 2, "client_processes": 1, "driver_node": False}
    assert environment["torch"] == torch.__version__ and environment["numpy"] == np.__version__
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "error" not in environment
    assert one["runtime"]["num_nodes"] == 1
    assert _losses(one) != _losses(two)  # the node count shows in the numbers here (cohorts of 10 against 5)
    runner.run(spec("simulation.num_nodes=2", "simulation.rounds=2"), tmp_path / "resumed")
    assert json.loads((checkpoint_folders(tmp_path / "resumed")[0] / STATE_FILE).read_text())["state"]["num_nodes"] == 2
    with caplog.at_level(logging.INFO, logger="octomil_sim"):
        resumed = runner.run(spec("simulation.num_nodes=null"), tmp_path / "resumed")  # a new run here: 1 node
    assert "resumed with the checkpoint's 2 Flower nodes (here a new run would have 1)" in caplog.text
    assert resumed["runtime"]["num_nodes"] == 2
    assert _losses(resumed) == _losses(two)
    with pytest.raises(ConfigError) as err:  # a count set on the command line must be the checkpoint's
        runner.run(spec("simulation.num_nodes=3", "simulation.rounds=6"), tmp_path / "resumed")
    assert str(err.value) == (f"simulation.num_nodes=3: the checkpoint in {tmp_path / 'resumed'} was made with 2 Flower "
                              "nodes (which clients share a message, and so the numbers); allowed: 2 or null (the "
                              "checkpoint's count), or a new hydra.run.dir")


def test_a_checkpoint_from_before_the_node_count_was_kept_gives_its_configs_count():
    sim = {"backend": "local", "num_clients": 20, "num_nodes": None, "ray_num_cpus": None, "num_cpus_per_client": 1,
           "num_gpus_per_client": 0.0, "ray_address": None}
    assert runner.saved_num_nodes({"config": {"simulation": sim}}) == 1
    assert runner.saved_num_nodes({"config": {"simulation": {**sim, "num_nodes": 4}}}) == 4
    assert runner.saved_num_nodes({"config": {"simulation": {**sim, "backend": "ray", "ray_num_cpus": 3}}}) == 3
    assert runner.saved_num_nodes({"config": {"simulation": {**sim, "backend": "ray", "ray_num_cpus": 64}}}) == 20
    assert runner.saved_num_nodes({"num_nodes": 5, "config": {"simulation": sim}}) == 5
    assert runner.saved_num_nodes({"config": {}}) is None
