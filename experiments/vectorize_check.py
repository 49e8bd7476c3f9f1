"""Check (not a test): four cells of the fairness table (seed 0, 1,000 rounds) run client by client and
vectorized, two at a time; prints the table in experiments/README.md, "Speed".

    python experiments/vectorize_check.py
"""
import json, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from fairness_synthetic import DATA, size_groups, BOUND
cells = {"fedavg": ["strategy=fedavg"], "tilted_t1": ["strategy=tilted", "strategy.server.t=1.0"],
         "qffl_q1": ["strategy=qffl", "strategy.server.q=1.0"],
         "bgl": ["strategy=bounded_group_loss", f"strategy.server.max_group_loss={BOUND}"]}
def one(args):
    name, vec = args
    out = f"/tmp/vec_check/{name}_{vec}"
    cmd = [sys.executable, "-m", "octomil_sim", *cells[name], *DATA, "simulation.seed=0", "simulation.rounds=1000",
           f"groups_file={size_groups(0)}", f"simulation.vectorize={vec}", f"hydra.run.dir={out}", "progress=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    return name, vec, json.load(open(f"{out}/results.json"))["final"]
with ThreadPoolExecutor(2) as pool:
    got = list(pool.map(one, [(n, v) for n in cells for v in ("false", "true")]))
res = {(n, v): f for n, v, f in got}
print("| cell (seed 0, 1,000 rounds) | global acc: client by client / vectorized | bottom-10% | mean loss |")
print("|---|---|---|---|")
for n in cells:
    a, b = res[(n, "false")], res[(n, "true")]
    print(f"| {n} | {100*a['global_acc']:.2f} / {100*b['global_acc']:.2f} | {100*a['global_acc_bottom10']:.2f} / {100*b['global_acc_bottom10']:.2f} | {a['global_loss']:.4f} / {b['global_loss']:.4f} |")
