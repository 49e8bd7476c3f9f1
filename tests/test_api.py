"""``octomil_sim.simulate`` (issue 10, part 2): the README's example runs as written; bad keywords and
data are one ``ConfigError`` line before anything runs."""

import re
from pathlib import Path

import pandas as pd
import pytest

import octomil_sim
from octomil_sim.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_unknown_keyword_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        octomil_sim.simulate(roundz=3, out=tmp_path)
    message = str(err.value)
    assert message.startswith("roundz=3: not a simulate() argument; allowed: ") and "rounds" in message
    assert "\n" not in message


@pytest.mark.parametrize("kwargs, message", [
    ({"data": [[1, 2]]}, "data: a list; allowed: a pandas DataFrame or a datasets.Dataset (one row per example), "
                         "or None for the config's dataset"),
    ({"data": pd.DataFrame({"a": [1.0], "label": [0]})}, "data: no column 'client'; its columns: a, label "
                                                           "(name them with label=, client=, features=)"),
    ({"personalization": "dito"}, "personalization='dito' is not a known personalization; allowed: ditto, fedavg, "
                                  "fedp3, finetune, hierarchical, multitask, perfedavg, personal_layers, pfedme, prompt_tuning, scafflix"),
])
def test_bad_arguments_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as err:
        octomil_sim.simulate(out=tmp_path, **kwargs)
    assert str(err.value) == message


def test_client_ids_are_numbered_as_the_natural_id_partitioner_numbers_them(tmp_path):
    """flwr-datasets numbers the sorted ids: the groups and the results' client column must follow."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    from octomil_sim.api import _dataset
    from octomil_sim.data import table_file

    frame = pd.DataFrame({"client": ["b", "b", "a", "c"], "label": [0, 1, 0, 1], "f0": [1.0, 2.0, 3.0, 4.0]})
    node, ids = _dataset(frame, tmp_path, "label", "client", None)
    assert ids == ["a", "b", "c"]
    partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = table_file(node["source"]["path"])
    assert [set(partitioner.load_partition(i)["client"]) for i in range(3)] == [{"a"}, {"b"}, {"c"}]
    assert len(node["source"]["sha256"]) == 64  # the data is part of the run's config


def _run_readme_snippet(heading: str, folder, monkeypatch) -> dict:
    """Run the first ``python`` block after ``heading`` in the README as written, in ``folder``; its globals."""
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)
    monkeypatch.chdir(folder)
    scope: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The "Use from Python" snippet, as written (in a scratch folder): a module defined in the script
    itself reaches Ray's actors, the groups are keyed by the data's client ids."""
    result = _run_readme_snippet("### Use from Python", tmp_path, monkeypatch)["result"]
    assert len(result.rounds) == 15 and len(result.clients) == 8
    assert set(result.clients["client"]) == {f"device-{k}" for k in range(8)}
    assert result.raw["name"] == "personal_layers + tilted on user_data"
    assert set(result.groups.index) == {"old", "new"}
    assert result.personalized_acc > result.global_acc  # personal heads on devices with their own rules
    assert (tmp_path / "outputs" / "from_python" / "results.json").is_file()
    assert "worst-group improvement" in capsys.readouterr().out


@pytest.mark.slow
def test_the_readme_run_spec_example_runs(tmp_path, monkeypatch, capsys):
    """The "One run spec" snippet, as written: a spec built in Python, one field replaced, run."""
    results = _run_readme_snippet("### One run spec", tmp_path, monkeypatch)["results"]
    assert len(results["rounds"]) == 5 and len(results["clients"]) == 20
    assert results["name"] == "ditto + tilted on synthetic" and results["config"]["simulation"]["rounds"] == 5
    assert capsys.readouterr().out.startswith("ditto + tilted on synthetic 0.05 [0.1, 1.0, 2.0]")
