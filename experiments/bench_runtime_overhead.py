"""Benchmark (not a test): the ClientApp's own per-client work, without Flower or Ray: 200 rounds of two
train messages of 5 clients (Synthetic(1, 1), MLR) through ``ClientRuntime.train_message`` against the
bare ``algorithm.train`` calls on the same clients, in one process.

    python experiments/bench_runtime_overhead.py loop    # simulation.vectorize=false
    python experiments/bench_runtime_overhead.py vec
"""
import time, random, copy, sys
from hydra import compose, initialize_config_module
from flwr.app import ConfigRecord, RecordDict
from octomil_sim.spec import RunSpec
from octomil_sim.client_app import client_runtime
from octomil_sim.batching import pack
from octomil_sim.runner import initial_arrays
from strategies.fedavg import MEASURE_LOSS_BEFORE
vec = sys.argv[1] == "vec"
with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
    spec = RunSpec.from_config(compose("config", overrides=["strategy=fedavg","model=mlr","dataset.source.alpha=1","dataset.source.beta=1","simulation.num_clients=100","simulation.clients_per_round=10","simulation.state_store=memory",f"simulation.vectorize={str(vec).lower()}", "simulation.state_dir=/tmp/x"]))
rt = client_runtime(spec)
arrays = initial_arrays(spec)
R=200
# runtime path: two messages of 5 clients per round
t=time.perf_counter()
for r in range(1,R+1):
    random.seed(r); sampled=sorted(random.sample(range(100),10))
    for half in (sampled[:5], sampled[5:]):
        rt.train_message(pack([(p, RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r, MEASURE_LOSS_BEFORE: False})})) for p in half]))
runtime=time.perf_counter()-t
# plain: the algorithm's train per client
model=copy.deepcopy(rt.template)
state=arrays.to_torch_state_dict()
t=time.perf_counter()
for r in range(1,R+1):
    random.seed(r); sampled=sorted(random.sample(range(100),10))
    for p in sampled:
        model.load_state_dict(state)
        task=rt.task(RecordDict({"config": ConfigRecord({"server-round": r, MEASURE_LOSS_BEFORE: False})}), p, salt=0)
        rt.algorithm.train(model, task)
plain=time.perf_counter()-t
print(f"{'vec' if vec else 'loop'}: runtime {runtime:.2f}s plain {plain:.2f}s ratio {runtime/plain:.2f}")
