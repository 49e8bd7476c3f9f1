"""Benchmark (not a test): the driver's memory does not grow with the number of clients that keep
personal state, because that state lives in the client-state store, not in Flower's contexts.

Runs Ditto with personal MLPs for 500 and 5,000 clients (every client trains about once), reads the
driver's resident memory after the first and the last round from ``results.json``, and the size of
the on-disk client state; writes the table into ``experiments/README.md``.

    python experiments/bench_client_state.py
"""

from __future__ import annotations

from common import HERE, run_cell, write_block

RESULTS = HERE / "results" / "bench_client_state"
PER_ROUND = 100


def run(num_clients: int) -> tuple[dict, int, int]:
    out = RESULTS / f"clients{num_clients}"
    results = run_cell(out, ["strategy=ditto", "model=mlp", f"simulation.num_clients={num_clients}",
                             f"simulation.clients_per_round={PER_ROUND}", f"simulation.rounds={num_clients // PER_ROUND}",
                             "simulation.fraction_evaluate=0"])
    files = list((out / "client_state").rglob("*.pt"))
    return results, len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    rows = ["| clients | rounds | clients with stored personal model | state on disk (MB) "
            "| driver RSS after round 1 (MB) | after last round (MB) | after evaluating all clients (MB) | wall time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for n in (500, 5000):
        r, files, size = run(n)
        rounds = r["rounds"]
        rows.append(f"| {n} | {len(rounds)} | {files} | {size / 1e6:.1f} | {rounds[0]['driver_rss_mb']:.0f} "
                    f"| {rounds[-1]['driver_rss_mb']:.0f} | {r['final']['driver_rss_mb']:.0f} | {r['wall_time_s']:.0f} |")
    write_block("bench_client_state", rows)


if __name__ == "__main__":
    main()
