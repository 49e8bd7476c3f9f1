"""Benchmark (not a test): CPU seconds per process of a command's whole process tree, sampled every 0.5 s
from /proc (driver, Ray's GCS and raylet, client actors). Used for issue 12's per-round overhead:

    python experiments/cpu_by_process.py python -m octomil_sim strategy=fedavg model=mlr dataset.source.alpha=1 \\
        dataset.source.beta=1 simulation.clients_per_round=10 simulation.rounds=1000 simulation.fraction_evaluate=0 \\
        simulation.checkpoint_every=0 progress=false simulation.vectorize=false hydra.run.dir=/tmp/cpu_run
"""
import os, subprocess, sys, time
from pathlib import Path
tick = os.sysconf("SC_CLK_TCK")
def tree(root):
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = Path(f"/proc/{e}/stat").read_text()
                kids.setdefault(int(st.rsplit(")",1)[1].split()[1]), []).append(int(e))
            except Exception: pass
    out, todo = [], [root]
    while todo:
        p = todo.pop(); out.append(p); todo += kids.get(p, [])
    return out
cpu, names = {}, {}
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while proc.poll() is None:
    for p in tree(proc.pid):
        try:
            st = Path(f"/proc/{p}/stat").read_text().rsplit(")",1)[1].split()
            cpu[p] = (int(st[11]) + int(st[12])) / tick
            if p not in names:
                names[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
        except Exception: pass
    time.sleep(0.5)
wall = time.perf_counter() - start
print(f"wall {wall:.1f}s, total cpu {sum(cpu.values()):.1f}s")
for p, c in sorted(cpu.items(), key=lambda x: -x[1])[:12]:
    print(f"{c:7.1f}s  {names.get(p,'?')}")
