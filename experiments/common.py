"""What every reproduction script shares: run a cell once, summarise seeds, rewrite its README block."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"


def slug(name: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_cell(out: Path, overrides: list[str]) -> dict:
    """``python -m octomil_sim <overrides>`` into ``out`` unless its ``results.json`` exists."""
    if not (out / "results.json").exists():
        cmd = [sys.executable, "-m", "octomil_sim", *overrides, f"hydra.run.dir={out}", "progress=false"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1, population: bool = False) -> str:
    """``mean ± std`` of ``values`` times ``scale``: the sample std, or the population std (NumPy's
    ``np.std``, what pFedMe's official ``average_data`` reports) with ``population``."""
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    spread = statistics.pstdev(values) if population else statistics.stdev(values)
    return f"{m:.{digits}f} ± {spread * scale:.{digits}f}"


def check_block(name: str) -> None:
    """Stop before any work when README.md has no ``name`` block for ``write_block`` to fill."""
    text = README.read_text()
    if f"<!-- {name}:begin -->" not in text or f"<!-- {name}:end -->" not in text:
        blocks = sorted({line[5:-10] for line in text.splitlines()
                         if line.startswith("<!-- ") and line.endswith(":begin -->")})
        raise SystemExit(f"--block={name}: experiments/README.md has no such block; allowed: {', '.join(blocks)}")


def write_block(name: str, lines: list[str]) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in README.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = README.read_text()
    block = "\n".join([begin, *lines, end])
    README.write_text(text[: text.index(begin)] + block + text[text.index(end) + len(end):])
    print(block)
