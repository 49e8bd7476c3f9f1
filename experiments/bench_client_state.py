"""Benchmark (not a test): the driver's memory does not grow with the number of clients that keep
personal state, because that state lives in the client-state store, not in Flower's contexts.

Runs Ditto with personal MLPs for 500 and 5,000 clients (every client trains about once), reads the
driver's resident memory after the first and the last round from ``results.json``, and the size of
the on-disk client state; writes the table into ``experiments/README.md``.

    python experiments/bench_client_state.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench_client_state"
README = HERE / "README.md"
BEGIN, END = "<!-- bench_client_state:begin -->", "<!-- bench_client_state:end -->"
PER_ROUND = 100


def run(num_clients: int) -> tuple[dict, int, int]:
    out = RESULTS / f"clients{num_clients}"
    if not (out / "results.json").exists():
        cmd = [sys.executable, "-m", "octomil_sim", "strategy=ditto", "model=mlp",
               f"simulation.num_clients={num_clients}", f"simulation.clients_per_round={PER_ROUND}",
               f"simulation.rounds={num_clients // PER_ROUND}", "simulation.fraction_evaluate=0",
               f"hydra.run.dir={out}", "+progress=false"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    files = list((out / "client_state").rglob("*.pt"))
    return json.loads((out / "results.json").read_text()), len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    rows = ["| clients | rounds | clients with stored personal model | state on disk (MB) "
            "| driver RSS after round 1 (MB) | after last round (MB) | after evaluating all clients (MB) | wall time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for n in (500, 5000):
        r, files, size = run(n)
        rounds = r["rounds"]
        rows.append(f"| {n} | {len(rounds)} | {files} | {size / 1e6:.1f} | {rounds[0]['driver_rss_mb']:.0f} "
                    f"| {rounds[-1]['driver_rss_mb']:.0f} | {r['final']['driver_rss_mb']:.0f} | {r['wall_time_s']:.0f} |")
    block = "\n".join([BEGIN, *rows, END])
    text = README.read_text()
    README.write_text(text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):])
    print(block)


if __name__ == "__main__":
    main()
