"""The ``octomil-sim`` command (issue 10, part 3): ``train`` flags become Hydra overrides, ``init`` writes
a project that trains offline at once, ``report`` tables runs and sweeps (mean ± std over seeds),
``compare`` says whether a rerun gives a run's numbers and, where not, where they part."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from octomil_sim.cli import compare, report_table, train_overrides, write_project
from octomil_sim.errors import ConfigError


def test_train_flags_are_the_overrides_they_name(tmp_path):
    groups = tmp_path / "g.json"
    groups.write_text("{}")
    got = train_overrides(["--personalization", "scafflix", "--fairness", "bounded-group-loss", "--groups-file",
                           str(groups), "--rounds", "50", "--seed", "3", "simulation.lr=0.1", "--privacy", "dp-sgd",
                           "--backend", "local", "--gpus-per-client", "0.5"],
                          cwd=tmp_path)
    assert got == ["personalization=scafflix", "fairness=bounded_group_loss", "privacy=dp_sgd",
                   f"groups_file={groups.resolve()}",
                   "simulation.rounds=50", "simulation.seed=3", "simulation.backend=local",
                   "simulation.num_gpus_per_client=0.5", "simulation.lr=0.1"]


@pytest.mark.parametrize("argv, message", [
    (["--personalization", "scaflix"], "--personalization='scaflix': allowed: ditto, fedavg, fedp3, finetune, "
                                       "hierarchical, multitask, perfedavg, personal-layers, pfedme, prompt-tuning, "
                                       "scafflix"),
    (["--privacy", "dp"], "--privacy='dp': allowed: client-level, dp-sgd, none"),
    (["--fairness", "tilt"], "--fairness='tilt': allowed: bounded-group-loss, maxfl, none, qffl, tilted"),
    (["--groups-file", "nowhere.json"], "--groups-file='nowhere.json': no such file; allowed: a JSON file "
                                        "{client id: group}"),
])
def test_bad_train_flags_are_one_line(tmp_path, argv, message):
    with pytest.raises(ConfigError) as err:
        train_overrides(argv, cwd=tmp_path)
    assert str(err.value) == message


def test_init_writes_a_project_whose_train_uses_it(tmp_path):
    project = tmp_path / "proj"
    write_project(project, "ditto", num_clients=6)
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "conf", "data", "groups.json", "model.py"]
    rows = (project / "data" / "clients.csv").read_text().splitlines()
    assert rows[0] == "client,label,f0,f1,f2,f3,f4,f5,f6,f7,f8,f9"
    assert {r.split(",")[0] for r in rows[1:]} == {str(k) for k in range(6)}
    assert set(json.loads((project / "groups.json").read_text())) == {str(k) for k in range(6)}
    assert train_overrides([], cwd=project) == [f"hydra.searchpath=[file://{(project / 'conf').resolve()}]",
                                                "experiment=project"]
    with pytest.raises(ConfigError, match="it exists already"):
        write_project(project, "ditto")


def _run(folder: Path, overrides: list[str], seed: int, acc: float, improvement: float | None = None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in [*overrides, f"simulation.seed={seed}",
                                                                                    "progress=false"]))
    final = {"global_acc": acc, "personalized_acc": acc + 0.1, "global_acc_bottom10": acc / 2,
             "personalized_acc_bottom10": acc / 2}
    results = {"final": final}
    if improvement is not None:
        results["worst_group_improvement"] = {"value": improvement}
    (folder / "results.json").write_text(json.dumps(results))


def test_report_groups_seeds_under_the_overrides_that_differ(tmp_path):
    _run(tmp_path / "0", ["fairness=none"], 0, 0.50, 0.1)
    _run(tmp_path / "1", ["fairness=none"], 1, 0.60, 0.3)
    _run(tmp_path / "2", ["fairness=tilted"], 0, 0.70)
    header, rows = report_table(sorted(p for p in tmp_path.iterdir()))
    assert header == ["fairness", "runs", "global_acc", "personalized_acc", "global_acc_bottom10",
                      "personalized_acc_bottom10", "worst_group_improvement"]
    # 0.5 and 0.6: mean 55, sample std 7.07; improvements 0.1 and 0.3: 20 ± 14.14
    assert rows[0] == ["none", "2", "55.00 ± 7.07", "65.00 ± 7.07", "27.50 ± 3.54", "27.50 ± 3.54", "20.00 ± 14.14"]
    assert rows[1] == ["tilted", "1", "70.00", "80.00", "35.00", "35.00", ""]


@pytest.mark.slow
def test_init_then_train_and_a_sweep_then_report(tmp_path):
    """The README's CLI commands on a fresh project: train offline at once, a composed run with a groups
    file, and a two-seed sweep that ``report`` turns into one row."""
    exe = [sys.executable, "-m", "octomil_sim"]
    subprocess.run([*exe, "init", "proj", "--personalization", "ditto"], cwd=tmp_path, check=True, capture_output=True)
    project = tmp_path / "proj"
    first = subprocess.run([*exe, "train", "--rounds", "2", "--out", "run1", "progress=false"], cwd=project,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "ditto on project_data: global_acc" in first.stdout
    composed = subprocess.run([*exe, "train", "--personalization", "scafflix", "--fairness", "bounded-group-loss",
                               "--groups-file", "groups.json", "--rounds", "2", "--out", "run2", "progress=false"],
                              cwd=project, capture_output=True, text=True, timeout=300)
    assert composed.returncode == 0, composed.stderr
    results = json.loads((project / "run2" / "results.json").read_text())
    assert results["name"] == "scafflix + bounded_group_loss on project_data"
    assert set(results["groups"]) == {"small", "large"} and "group_bound" in results
    sweep = subprocess.run([*exe, "train", "-m", "simulation.seed=0,1", "--rounds", "2", "hydra.sweep.dir=sweep",
                            "progress=false"], cwd=project, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr
    table = subprocess.run([*exe, "report", "sweep"], cwd=project, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| runs | global_acc |") and len(lines) == 3 and "| 2 |" in lines[2]
    assert (project / "sweep" / "report.csv").is_file()


def _results(folder: Path, losses: list[float], acc: float, seconds: float = 1.0, runtime: dict | None = None,
             made_in: str | None = None, **extra) -> None:
    """A results.json as a run writes it (the parts ``compare`` reads), its state folder inside ``folder``
    (or inside ``made_in``: where a run copied here was made)."""
    folder.mkdir(parents=True)
    results = {"config": {"simulation": {"lr": 0.1, "state_dir": f"{made_in or folder.resolve()}/client_state"}},
               "rounds": [{"round": i + 1, "train_loss": x, "time_s": seconds * (i + 1)} for i, x in enumerate(losses)],
               "final": {"global_acc": acc, "driver_rss_mb": 500 * seconds}, **extra}
    if runtime is not None:
        results["runtime"] = runtime
    (folder / "results.json").write_text(json.dumps(results))


def _machine(capability: str) -> dict:
    return {"num_nodes": 2, "environment": {"torch": "2.13.0+cpu", "cpu_capability": capability}}


def test_compare_says_which_reruns_give_the_same_numbers_and_where_the_others_part(tmp_path, capsys):
    first, second = tmp_path / "stored", tmp_path / "rerun"
    # the same numbers: other wall times, memory and run folders (state_dir; the stored run was made in
    # another checkout) do not count
    _results(first / "a" / "seed0", [0.5, 0.4], 0.8, made_in="/elsewhere/experiments/results/a/seed0")
    _results(second / "a" / "seed0", [0.5, 0.4], 0.8, seconds=3.0)
    # parts in round 2 by 1e-9 (another CPU's kernels), then in the final accuracy by 0.25 points
    _results(first / "b" / "seed0", [0.5, 0.4, 0.3], 0.8, runtime=_machine("AVX512"))
    _results(second / "b" / "seed0", [0.5, 0.400000001, 0.300000002], 0.8025, runtime=_machine("AVX2"))
    _results(first / "c" / "seed0", [0.5], 0.8, loss_before=[0.7])  # a metric a later version dropped
    _results(second / "c" / "seed0", [0.5], 0.8)
    _results(first / "d" / "seed0", [0.5], 0.8)  # not rerun
    assert compare([str(first), str(second)]) == 1
    out = capsys.readouterr().out.splitlines()
    b = out.index("b/seed0: different numbers")
    assert out[:b] == ["a/seed0: the same numbers"]
    assert out[b + 1] == "  first difference: rounds[1].train_loss: 0.4 against 0.400000001"
    assert out[b + 2].startswith("  3 values differ (in rounds[*].train_loss (2), final.global_acc); the largest gap "
                                 "between two floats: 0.0025")
    assert out[b + 3] == "  final accuracies: up to 0.25 points apart"
    assert out[b + 4] == "  machine: cpu_capability AVX512 / AVX2"
    assert out[b + 5:] == ["c/seed0: the same numbers", "  only the first run reports: loss_before",
                           "only under the first folder: d/seed0", "2 of 3 runs give the same numbers; 1 not rerun"]

    # within a tolerance, b's numbers count as the same; d still lacks its rerun
    assert compare([str(first / "b"), str(second / "b"), "--tolerance", "0.003"]) == 0
    assert capsys.readouterr().out.splitlines() == ["seed0: the same numbers (within the tolerance)",
                                                    "1 of 1 runs give the same numbers"]
    # other settings are named, and two run folders compare as one pair
    _results(second / "e", [0.5], 0.8)
    (second / "e" / "results.json").write_text((second / "e" / "results.json").read_text().replace('"lr": 0.1', '"lr": 0.2'))
    assert compare([str(first / "d" / "seed0"), str(second / "e")]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [f"{second / 'e'}: the same numbers",
                                                        "  settings differ: simulation.lr 0.1 / 0.2"]
    # a run cut short: its rows are counted, not walked
    assert compare([str(first / "a" / "seed0"), str(second / "e")]) == 1
    assert "  first difference: rounds: 2 entries against 1 entries" in capsys.readouterr().out.splitlines()


def test_compare_counts_nan_types_and_missing_sections_as_they_are(tmp_path, capsys):
    """NaN equals NaN and nothing else; a bool is not a number, 1 is not 1.0; a rerun without a
    section the run has (``final``) differs; a run only the rerun folder has does not fail it."""
    nan = float("nan")
    _results(tmp_path / "a" / "r", [nan, 0.4], 0.8)
    _results(tmp_path / "b" / "r", [nan, 0.4], 0.8)
    _results(tmp_path / "b" / "extra", [0.5], 0.8)  # only under the second folder
    assert compare([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines() == ["r: the same numbers", "only under the second folder: extra",
                                                    "1 of 1 runs give the same numbers"]
    _results(tmp_path / "one", [nan, 0.4], 1.0)
    for base, value in [("a/r", nan), ("one", True), ("one", 1)]:  # against 0.8, 1.0 and 1.0
        text = (tmp_path / base / "results.json").read_text()
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / "results.json").write_text(re.sub(r'"global_acc": [0-9.]+', f'"global_acc": {json.dumps(value)}', text))
        integer = type(value) is int
        tolerance = [] if integer else ["--tolerance", "0.5"]  # 1 and 1.0: no gap, yet other bits
        assert compare([str(tmp_path / base), str(tmp_path / "c"), *tolerance]) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[1] == f"  first difference: final.global_acc: {0.8 if base == 'a/r' else 1.0!r} against {value!r}"
        assert out[3] == ("  final accuracies: equal in value, not in type (an int against a float)" if integer
                          else "  final accuracies: not comparable (not two numbers)")
    assert compare([str(tmp_path / "one"), str(tmp_path / "c"), "--tolerance", "1e-9"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{tmp_path / 'c'}: the same numbers (within the tolerance)"
    results = json.loads((tmp_path / "a" / "r" / "results.json").read_text())
    del results["final"]
    (tmp_path / "c" / "results.json").write_text(json.dumps(results))
    assert compare([str(tmp_path / "a" / "r"), str(tmp_path / "c")]) == 1
    assert capsys.readouterr().out.splitlines()[1] == "  first difference: final: has it against lacks it"


def test_compare_refuses_bad_folders_and_files_in_one_line(tmp_path):
    _results(tmp_path / "a", [0.5], 0.8)
    with pytest.raises(ConfigError, match=r"compare .*missing: no such folder; allowed: run folders or folders of runs"):
        compare([str(tmp_path / "a"), str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match=r"--tolerance=-1.0: allowed: a finite number >= 0"):
        compare([str(tmp_path / "a"), str(tmp_path / "a"), "--tolerance", "-1"])
    with pytest.raises(ConfigError, match=r"compare .*results.json: not a folder; allowed"):
        compare([str(tmp_path / "a" / "results.json"), str(tmp_path / "a")])
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "results.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list/results.json: a JSON list, not an object; allowed: a finished run's"):
        compare([str(tmp_path / "a"), str(tmp_path / "list")])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text('{"rounds": [')
    with pytest.raises(ConfigError, match=r"b/results.json: not readable JSON .*allowed: a finished run's results.json"):
        compare([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "c").mkdir()
    with pytest.raises(ConfigError, match=r"^compare .*c: no results.json under it"):
        compare([str(tmp_path / "a"), str(tmp_path / "c")])
    done = subprocess.run([sys.executable, "-m", "octomil_sim", "compare", str(tmp_path / "a"), str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.splitlines()[-1]) == (0, "1 of 1 runs give the same numbers")
