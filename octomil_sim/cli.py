"""The ``octomil-sim`` command: ``init`` a project, ``train`` it, ``report`` on runs and sweeps,
``compare`` a rerun with the run it repeats.

    octomil-sim init my_project --personalization ditto
    cd my_project && octomil-sim train --personalization scafflix --fairness bounded-group-loss \
        --groups-file groups.json --rounds 50 [hydra overrides ...]
    octomil-sim report multirun/2026-11-25/12-00-00 [--csv table.csv]
    octomil-sim compare experiments/results/reproduce rerun/results/reproduce [--tolerance 1e-6]

``train`` turns its flags into Hydra overrides (``--personalization scafflix`` is
``personalization=scafflix``; names may use ``-`` for ``_``) and runs exactly what
``python -m octomil_sim <overrides>`` runs. Inside a folder made by ``init`` (it has
``conf/experiment/project.yaml``) the project's configs are on Hydra's search path, its folder on the
Python path (its ``model.py``) and ``experiment=project`` is the default.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from pathlib import Path

from octomil_sim.errors import ConfigError

PROJECT_EXPERIMENT = Path("conf") / "experiment" / "project.yaml"


# --- train ----------------------------------------------------------------------------------------
def _choice(group: str, value: str) -> str:
    from octomil_sim.config import group_options

    name = value.replace("-", "_")
    allowed = group_options(group)
    if name not in allowed:
        raise ConfigError(f"--{group}={value!r}: allowed: {', '.join(a.replace('_', '-') for a in allowed)}")
    return name


def train_overrides(argv: list[str], cwd: Path | None = None) -> list[str]:
    """The Hydra overrides that ``octomil-sim train <argv>`` stands for (in a project folder: its
    search path and ``experiment=project`` unless another experiment is named)."""
    parser = argparse.ArgumentParser(prog="octomil-sim train", description="Run one training (a Hydra run; "
                                     "pass -m and comma lists for a sweep). Other arguments are Hydra overrides.")
    parser.add_argument("--personalization", help="fedavg, finetune, ditto, pfedme, perfedavg, scafflix, "
                        "personal-layers, fedp3, prompt-tuning, hierarchical, multitask")
    parser.add_argument("--fairness", help="none, tilted, qffl, bounded-group-loss, maxfl")
    parser.add_argument("--privacy", help="none, client-level (DP-FedAvg), dp-sgd (privacy.server.epsilon=..., "
                        "privacy.client.epsilon=...)")
    parser.add_argument("--groups-file", help="JSON {client id: group}: per-group metrics; bounded group loss")
    parser.add_argument("--rounds", type=int, help="simulation.rounds")
    parser.add_argument("--clients", type=int, help="simulation.num_clients")
    parser.add_argument("--seed", type=int, help="simulation.seed")
    parser.add_argument("--out", help="the run folder (hydra.run.dir)")
    parser.add_argument("--backend", help="simulation.backend: ray (clients in Ray actors: several cores, clusters) "
                        "or local (in this process: no Ray start-up, least memory, one core)")
    parser.add_argument("--gpus-per-client", type=float, help="simulation.num_gpus_per_client: > 0 trains clients "
                        "on a GPU (a share of one per Ray actor)")
    parser.add_argument("--jobs", type=int, help="a -m sweep's jobs run this many at a time (Hydra's joblib "
                        "launcher), the CPUs shared among them")
    known, rest = parser.parse_known_args(argv)
    overrides = []
    cwd = cwd or Path.cwd()
    if (cwd / PROJECT_EXPERIMENT).is_file():
        overrides.append(f"hydra.searchpath=[file://{(cwd / 'conf').resolve()}]")
        if not any(a.lstrip("+").startswith("experiment=") for a in rest):
            overrides.append("experiment=project")
    if known.personalization:
        overrides.append(f"personalization={_choice('personalization', known.personalization)}")
    if known.fairness:
        overrides.append(f"fairness={_choice('fairness', known.fairness)}")
    if known.privacy:
        overrides.append(f"privacy={_choice('privacy', known.privacy)}")
    if known.groups_file:
        path = Path(known.groups_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--groups-file={known.groups_file!r}: no such file; allowed: a JSON file "
                              "{client id: group}")
        overrides.append(f"groups_file={path.resolve()}")
    for flag, key in (("rounds", "simulation.rounds"), ("clients", "simulation.num_clients"),
                      ("seed", "simulation.seed"), ("out", "hydra.run.dir"), ("backend", "simulation.backend"),
                      ("gpus_per_client", "simulation.num_gpus_per_client")):
        if getattr(known, flag) is not None:
            overrides.append(f"{key}={getattr(known, flag)}")
    if known.jobs is not None:
        overrides += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={known.jobs}"]
        if not any(a in ("-m", "--multirun") for a in rest):
            rest = ["-m", *rest]  # jobs side by side only exist in a sweep
    multirun = [a for a in rest if a in ("-m", "--multirun")]  # Hydra wants its flags before the overrides
    return multirun + overrides + [a for a in rest if a not in multirun]


# --- init -----------------------------------------------------------------------------------------
MODEL_PY = '''"""Your model. octomil-sim builds it as Net(input_shape=..., num_classes=...) from conf/model/project_model.yaml.
Personal layers (personalization=personal_layers, fedp3) are named by attribute: here `body` and `head`."""

import math

from torch import nn


class Net(nn.Module):
    def __init__(self, input_shape, num_classes, hidden=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(math.prod(input_shape), hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))
'''

EXPERIMENT_YAML = '''# @package _global_
# This project's run: your data (conf/dataset/project_data.yaml) and model (model.py), one client per
# value of the CSV's client column. Change anything here or on the command line (octomil-sim train ...).
defaults:
  - override /dataset: project_data
  - override /partition: natural_id
  - override /model: project_model
  - override /personalization: {personalization}
simulation:
  num_clients: {num_clients}
  clients_per_round: {per_round}
  rounds: 20
  lr: 0.05
  fraction_evaluate: 0.25
'''

DATASET_YAML = '''# Your data: a CSV or parquet file, one row per example, a client column, a label column, feature columns.
name: project_data
feature_key: x
label_key: y
client_id_key: client
input_shape: [{num_features}]
num_classes: {num_classes}
scale: 1.0
source:
  _target_: octomil_sim.data.table_file
  path: {path}
  label: label
  client: client
  features: null   # null: every column but label and client
'''

MODEL_YAML = '''name: project_model
net:
  _target_: model.Net
  hidden: 64
'''

README_MD = '''# {name}

An octomil-sim project: your model in `model.py`, your data in `data/clients.csv` (here: generated
example data, {num_clients} clients, {num_features} features, {num_classes} classes; replace it with yours,
same columns: `client`, `label`, features), the run in `conf/experiment/project.yaml`.

    octomil-sim train                                   # {personalization}, 20 rounds
    octomil-sim train --personalization ditto --fairness tilted --rounds 50
    octomil-sim train --fairness bounded-group-loss --groups-file groups.json fairness.policy.max_group_loss=1.0
    octomil-sim train -m simulation.seed=0,1,2 --personalization finetune,ditto && octomil-sim report multirun

Each run writes results.json (global and personalized accuracy per client and per group) and results.png
into outputs/<date>/<time>/ (or --out DIR). `groups.json` maps each client to a group (here by size).
'''


def write_project(folder: Path, personalization: str, num_clients: int = 20, num_features: int = 10,
                  num_classes: int = 5, seed: int = 0) -> None:
    """A runnable project in ``folder`` (which must not exist): config, model, example data, README."""
    import numpy as np

    if folder.exists():
        raise ConfigError(f"init {folder}: it exists already; allowed: a new folder name")
    rng = np.random.default_rng(seed)
    rows, groups = [], {}
    shared = rng.normal(size=(num_features, num_classes))
    for k in range(num_clients):  # each client: its own shift of a shared linear rule, sizes 30..120
        w = shared + 0.5 * rng.normal(size=shared.shape)
        n = int(rng.integers(30, 121))
        x = rng.normal(loc=rng.normal(scale=0.5), size=(n, num_features))
        y = (x @ w).argmax(1)
        rows += [[k, int(label), *map(float, feats)] for feats, label in zip(x, y)]
        groups[str(k)] = "small" if n < 75 else "large"
    (folder / "data").mkdir(parents=True)
    with (folder / "data" / "clients.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["client", "label", *(f"f{i}" for i in range(num_features))])
        writer.writerows(rows)
    (folder / "groups.json").write_text(json.dumps(groups, indent=1))
    (folder / "model.py").write_text(MODEL_PY)
    for sub in ("experiment", "dataset", "model"):
        (folder / "conf" / sub).mkdir(parents=True)
    values = {"personalization": personalization, "num_clients": num_clients, "per_round": max(1, num_clients // 4),
              "num_features": num_features, "num_classes": num_classes, "name": folder.name,
              "path": (folder / "data" / "clients.csv").resolve()}
    (folder / PROJECT_EXPERIMENT).write_text(EXPERIMENT_YAML.format(**values))
    (folder / "conf" / "dataset" / "project_data.yaml").write_text(DATASET_YAML.format(**values))
    (folder / "conf" / "model" / "project_model.yaml").write_text(MODEL_YAML)
    (folder / "README.md").write_text(README_MD.format(**values))


def init(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="octomil-sim init", description="Write a runnable project folder.")
    parser.add_argument("name")
    parser.add_argument("--personalization", default="finetune")
    args = parser.parse_args(argv)
    folder = Path(args.name)
    write_project(folder, _choice("personalization", args.personalization))
    print(f"created {folder}/ (model.py, data/clients.csv, groups.json, conf/); next: cd {folder} && octomil-sim train")


# --- report ---------------------------------------------------------------------------------------
REPORTED = ("global_acc", "personalized_acc", "global_acc_bottom10", "personalized_acc_bottom10")


def find_runs(paths: list[str], command: str = "report") -> list[Path]:
    """Every run folder (one with results.json) at or under ``paths``."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{command} {p}: {'not a folder' if p.exists() else 'no such folder'}; allowed: "
                              "run folders or folders of runs (a multirun folder)")
        runs += [p] if (p / "results.json").is_file() else sorted(r.parent for r in p.rglob("results.json")
                                                                  if r.is_file())
    if not runs:
        raise ConfigError(f"{command} {' '.join(paths)}: no results.json under it; allowed: finished runs")
    return runs


def _overrides(run: Path) -> dict[str, str]:
    """The run's command-line overrides (Hydra's .hydra/overrides.yaml), without where it was written."""
    file = run / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    from omegaconf import OmegaConf

    items = [str(o) for o in OmegaConf.load(file)]
    pairs = dict(o.lstrip("+~").split("=", 1) for o in items if "=" in o)
    return {k: v for k, v in pairs.items() if not k.startswith("hydra.") and k not in ("progress",)}


def report_table(runs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per combination of the overrides that differ between runs other than
    ``simulation.seed``, with ``mean ± std`` over its seeds of each ``REPORTED`` metric (in %) and
    the worst group's improvement where groups were given."""
    records = [(_overrides(r), json.loads((r / "results.json").read_text())) for r in runs]
    keys = sorted({k for o, _ in records for k in o})
    varying = [k for k in keys if len({o.get(k) for o, _ in records}) > 1 and k != "simulation.seed"]
    cells: dict[tuple, list[dict]] = {}
    for o, results in records:
        cells.setdefault(tuple(o.get(k, "") for k in varying), []).append(results)
    header = [*varying, "runs", *REPORTED, "worst_group_improvement"]
    rows = []
    for combo, results in cells.items():
        row = [*combo, str(len(results))]
        for metric in REPORTED:
            row.append(_mean_std([r["final"][metric] for r in results if metric in r["final"]]))
        row.append(_mean_std([r["worst_group_improvement"]["value"] for r in results
                              if r.get("worst_group_improvement", {}).get("value") is not None]))
        rows.append(row)
    return header, rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.mean(values) * 100
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {statistics.stdev(values) * 100:.2f}"


def report(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="octomil-sim report", description="One table of runs or sweeps: the "
                                     "overrides that differ against the final metrics, mean ± std over seeds.")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--csv", help="also write the table as CSV here (default: report.csv in the first folder)")
    args = parser.parse_args(argv)
    header, rows = report_table(find_runs(args.paths))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    out = Path(args.csv) if args.csv else Path(args.paths[0]) / "report.csv"
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    out.write_text(buffer.getvalue())
    print(f"(also {out})", file=sys.stderr)


# --- compare ---------------------------------------------------------------------------------------
#: what two runs of one config may differ in without their numbers differing: wall time, memory, the
#: machine record (``runtime``: ``compare`` prints its differences apart), the metrics' descriptions
NOT_NUMBERS = frozenset({"time_s", "wall_time_s", "driver_rss_mb", "runtime", "metric_definitions"})
#: the sections a finished run writes: one that a run lacks and the other has is a difference
SECTIONS = ("rounds", "final", "clients")


def paired_runs(a: str, b: str) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """(pairs, only in ``a``, only in ``b``): the runs under two folders matched by their path below
    them. Two run folders make one pair; a run folder and a folder of runs make none."""
    runs = [{str(r.relative_to(p)): r for r in find_runs([p], "compare")} for p in (a, b)]
    common = sorted(set(runs[0]) & set(runs[1]))
    return ([(rel, runs[0][rel], runs[1][rel]) for rel in common], sorted(set(runs[0]) - set(runs[1])),
            sorted(set(runs[1]) - set(runs[0])))


def _load(run: Path, rel: str = ".") -> dict:
    """``run``'s results.json, its own folder written ``<run>`` in its settings (``simulation.state_dir``):
    where it is now, or where it was made (a path ending in ``rel``, its path below the compared folder:
    runs copied from another checkout or machine). results.json is written by ``json.dumps``, so a
    folder appears as ``json.dumps`` escapes it."""
    file = run / "results.json"
    try:
        text = file.read_text().replace(json.dumps(str(run.resolve()))[1:-1], "<run>")
        if rel != ".":
            tail = re.escape(json.dumps(rel)[1:-1])
            text = re.sub(rf'"(?:[^"\\]|\\.)*/{tail}(?=[/"])', '"<run>', text)
        results = json.loads(text)
    except (OSError, ValueError) as err:
        raise ConfigError(f"compare {file}: not readable JSON ({err}); allowed: a finished run's results.json") from None
    if not isinstance(results, dict):
        raise ConfigError(f"compare {file}: a JSON {type(results).__name__}, not an object; allowed: a finished "
                          "run's results.json")
    return results


def _same(a, b) -> bool:
    """Bit for bit: the same type and value; NaN equals NaN, -0.0 is not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (math.isnan(a) and math.isnan(b))
    return a == b


class Described(str):
    """A difference that is not a value of either run ("600 entries", "lacks it"): shown as it reads."""

    def __repr__(self) -> str:
        return str(self)


def differences(a, b, where: str = "") -> tuple[list[tuple[str, object, object]], list[tuple[str, str]]]:
    """(differences, keys one side lacks) between two ``results.json`` values, walked in order
    (``rounds[0]`` before ``rounds[1]``): each difference is (where, value in a, value in b), compared
    by ``_same``; each one-sided key is (where, "first" or "second": the side that has it). Lists of
    other lengths are one difference; ``NOT_NUMBERS`` keys are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        one_side = [(f"{where}.{k}".lstrip("."), "first" if k in a else "second")
                    for k in sorted(set(a) ^ set(b)) if k not in NOT_NUMBERS]
        children = [(a[k], b[k], f"{where}.{k}".lstrip(".")) for k in a if k in b and k not in NOT_NUMBERS]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(where, Described(f"{len(a)} entries"), Described(f"{len(b)} entries"))], []
        one_side, children = [], [(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    else:
        return ([] if _same(a, b) else [(where, a, b)]), []
    diffs = []
    for x, y, at in children:
        d, o = differences(x, y, at)
        diffs += d
        one_side += o
    return diffs, one_side


def _gap(x, y) -> float:
    """|x - y| for two numbers (0 for two NaN); infinite otherwise (one NaN, a string, None, a bool, a
    list of another length), which no tolerance covers."""
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (x, y)):
        return math.inf
    if math.isnan(x) or math.isnan(y):
        return 0.0 if math.isnan(x) and math.isnan(y) else math.inf
    return abs(x - y)


def _keys(where: list[str], most: int = 4) -> str:
    """Keys with their row numbers folded: ``rounds[*].loss_before (600)``."""
    counts: dict[str, int] = {}
    for w in where:
        key = re.sub(r"\[\d+\]", "[*]", w)
        counts[key] = counts.get(key, 0) + 1
    shown = [k + (f" ({n})" if n > 1 else "") for k, n in list(counts.items())[:most]]
    return ", ".join(shown) + (f" and {len(counts) - most} more" if len(counts) > most else "")


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def compare_runs(a: dict, b: dict, tolerance: float = 0.0) -> tuple[bool, list[str]]:
    """(whether the numbers differ, what sets run ``b`` apart from run ``a``, a line each). The numbers
    differ beyond ``tolerance`` in absolute value, or where a section of ``SECTIONS`` one run lacks;
    then the lines start with the first difference, how many differ and the largest gap, the final
    accuracies. Either way they say which settings differ, the machine records where the numbers
    differ, and keys one run reports and the other does not (a metric a later version added or
    dropped)."""
    numbers_a = {k: v for k, v in a.items() if k != "config"}
    numbers_b = {k: v for k, v in b.items() if k != "config"}
    diffs, one_side = differences(numbers_a, numbers_b)
    has, lacks = Described("has it"), Described("lacks it")
    lacking = [(w, *((has, lacks) if side == "first" else (lacks, has))) for w, side in one_side if w in SECTIONS]
    beyond = lacking + [(w, x, y) for w, x, y in diffs if tolerance == 0 or _gap(x, y) > tolerance]
    lines = []
    if beyond:
        where, x, y = beyond[0]
        lines.append(f"first difference: {where}: {x!r} against {y!r}")
        gaps = [(_gap(x, y), w) for w, x, y in beyond]
        finite = [(g, w) for (g, w), (_, x, y) in zip(gaps, beyond)  # values, not counts (a best round's number)
                  if isinstance(x, float) and isinstance(y, float) and g != math.inf]
        lines.append(f"{len(beyond)} value{'s' * (len(beyond) > 1)} differ{'s' * (len(beyond) == 1)} "
                     f"(in {_keys([w for _, w in gaps])})"
                     + (f"; the largest gap between two floats: {max(finite)[0]:.3g} ({max(finite)[1]})" if finite else ""))
        final_a, final_b = _dict(a.get("final")), _dict(b.get("final"))
        accuracy_keys = [k for k in final_a if re.fullmatch(r"\w*acc\w*", k)]
        if accuracy_keys:
            gaps_acc = [_gap(final_a[k], final_b.get(k)) for k in accuracy_keys if not _same(final_a[k], final_b.get(k))]
            lines.append("final accuracies: " + (
                "the same" if not gaps_acc else
                "not comparable (not two numbers)" if math.inf in gaps_acc else
                f"up to {max(gaps_acc) * 100:.3g} points apart" if max(gaps_acc) > tolerance else
                f"within the tolerance (up to {max(gaps_acc):.3g})" if tolerance else
                "equal in value, not in type (an int against a float)"))
    settings, new_settings = differences(_dict(a.get("config")), _dict(b.get("config")))
    if settings:
        lines.append("settings differ: " + "; ".join(f"{w} {x!r} / {y!r}" for w, x, y in settings[:4])
                     + (f" and {len(settings) - 4} more" if len(settings) > 4 else ""))
    if beyond:
        ra, rb = a.get("runtime"), b.get("runtime")
        if not isinstance(ra, dict) or not isinstance(rb, dict):
            lines.append("machine: not recorded by " + " and ".join(
                n for n, r in (("the first", ra), ("the second", rb)) if not isinstance(r, dict))
                + " (runs made before 2026-11-27 have no record)")
        else:
            env_a, env_b = _dict(ra.get("environment")), _dict(rb.get("environment"))
            machine = [f"{k} {ra.get(k)} / {rb.get(k)}" for k in ("num_nodes",) if ra.get(k) != rb.get(k)]
            machine += [f"{k} {env_a.get(k)} / {env_b.get(k)}" for k in sorted(set(env_a) | set(env_b))
                        if env_a.get(k) != env_b.get(k)]
            lines.append("machine: " + ("; ".join(machine) if machine else "the same record (versions, CPU, its "
                                        "kernels, Flower nodes)"))
    for side in ("first", "second"):
        keys = [w for w, s in one_side if s == side and w not in SECTIONS]
        if keys:
            lines.append(f"only the {side} run reports: {_keys(keys)}")
        keys = [w for w, s in new_settings if s == side]
        if keys:
            lines.append(f"settings only the {side} run has: {_keys(keys)}")
    return bool(beyond), lines


def compare(argv: list[str]) -> int:
    """``octomil-sim compare FIRST SECOND``: prints, run by run, whether the rerun under ``SECOND`` gives
    the numbers of the run under ``FIRST`` (``compare_runs``); returns the exit status, 0 when every
    run under ``FIRST`` has a rerun with the same numbers (runs only under ``SECOND`` are listed, and
    do not count), else 1."""
    parser = argparse.ArgumentParser(prog="octomil-sim compare", description="Whether the runs under a second "
                                     "folder (a rerun) give the numbers of the runs under the first, run by run.")
    parser.add_argument("first", help="a run folder, or a folder of runs (e.g. experiments/results/reproduce)")
    parser.add_argument("second", help="the same for the rerun; runs are matched by their path below each folder")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="absolute difference two numbers may have and count as equal (default 0: bit for bit)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ConfigError(f"compare --tolerance={args.tolerance}: allowed: a finite number >= 0")
    pairs, only_first, only_second = paired_runs(args.first, args.second)
    same = 0
    for rel, run_a, run_b in pairs:
        numbers_differ, lines = compare_runs(_load(run_a, rel), _load(run_b, rel), args.tolerance)
        same += not numbers_differ
        print(f"{rel if rel != '.' else args.second}: " + ("different numbers" if numbers_differ else "the same numbers"
                                                          + (" (within the tolerance)" if args.tolerance else "")))
        for line in lines:
            print(f"  {line}")
    for name, rels in (("first", only_first), ("second", only_second)):
        if rels:
            print(f"only under the {name} folder: {', '.join(rels)}")
    print(f"{same} of {len(pairs)} runs give the same numbers"
          + (f"; {len(only_first)} not rerun" if only_first else ""))
    return 0 if same == len(pairs) and not only_first else 1
