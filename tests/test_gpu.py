"""The GPU path (issue 12): ``simulation.num_gpus_per_client > 0`` trains clients on ``cuda`` (models, client
data, loaded client state and vectorized cohorts there; what travels and what the state store keeps on the
CPU). The CUDA tests run where torch sees a GPU (``experiments/gpu_check.sh`` runs this file on a lent GPU
machine); the others check the parts that work the same without one."""

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from octomil_sim.batching import pack, unpack
from octomil_sim.client_app import FULL_FLOAT32, client_device, client_runtime, cohort_bytes, float_modes, run_clients
from octomil_sim.cohort import cohort_sgd, vectorizes
from octomil_sim.config import validate
from octomil_sim.errors import ConfigError
from octomil_sim.state import DiskStateStore, MemoryStateStore
from octomil_sim.training import BatchStream, StepBudget, sgd_epochs

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
SMALL = ["simulation.num_clients=12", "simulation.clients_per_round=6", "simulation.rounds=3",
         "simulation.checkpoint_every=0", "progress=false"]


# --- without a GPU --------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    (2, "simulation.num_gpus_per_client=2: allowed: a number in [0, 1]"),
    (-0.5, "simulation.num_gpus_per_client=-0.5: allowed: a number in [0, 1]"),
])
def test_a_gpu_share_outside_one_gpu_is_refused(make_spec, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(make_spec(f"simulation.num_gpus_per_client={value}"))


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_a_gpu_run_on_a_machine_without_one_is_refused_before_anything_starts(make_spec):
    with pytest.raises(ConfigError, match=r"simulation.num_gpus_per_client=0.5: allowed: 0 on this machine: torch "
                                          r"sees no CUDA device"):
        validate(make_spec("simulation.num_gpus_per_client=0.5"))
    validate(make_spec("simulation.num_gpus_per_client=0.5", "simulation.ray_address=auto"))  # a cluster's own GPUs


def test_the_client_device_follows_the_gpu_share(make_spec):
    assert client_device(make_spec("simulation.num_gpus_per_client=0").simulation) == torch.device("cpu")
    if CUDA:
        assert client_device(make_spec("simulation.num_gpus_per_client=0.5").simulation).type == "cuda"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # full float32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    else:
        with pytest.raises(RuntimeError, match="num_gpus_per_client=0.5: this client process sees no CUDA device"):
            client_device(make_spec("simulation.num_gpus_per_client=0.5").simulation)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_client_state_is_stored_on_the_cpu_and_loaded_on_the_clients_device(store, tmp_path):
    """``meta`` stands in for a GPU: a load gives the bound device's tensors, the store keeps the CPU's."""
    backend = MemoryStateStore() if store == "memory" else DiskStateStore(tmp_path)
    backend.bind(3).save("h", {"w": torch.tensor([1.5, -2.0])})
    loaded = backend.bind(3, torch.device("meta")).load("h")
    assert loaded["w"].device.type == "meta" and loaded["w"].shape == (2,)
    assert backend.bind(3, "cpu").load("h")["w"].tolist() == [1.5, -2.0]
    assert backend.bind(4, torch.device("meta")).load("h") is None
    if store == "memory":
        assert backend._states[(3, "h")]["w"].device.type == "cpu"


def test_a_gpu_client_runtime_keeps_its_clients_data_within_a_budget(make_spec, monkeypatch):
    """``meta`` stands in for a GPU: data moved once, reused, the least recently used dropped over budget."""
    import octomil_sim.client_app as client_app

    client_runtime.cache_clear()
    runtime = client_runtime(make_spec(*SMALL, "simulation.state_store=memory"))
    client_runtime.cache_clear()
    runtime.device = torch.device("meta")
    size = [runtime.data.client(pid).nbytes for pid in range(3)]
    monkeypatch.setattr(client_app, "DEVICE_DATA_BYTES", size[0] + max(size[1], size[2]))  # two fit, not three
    first = runtime.client_data(0)
    assert first.x_train.device.type == "meta" and runtime.client_data(0) is first  # moved once
    runtime.client_data(1)
    assert list(runtime._on_device) == [0, 1]
    runtime.client_data(0)  # now the most recent
    runtime.client_data(2)  # over budget: client 1 goes
    assert list(runtime._on_device) == [0, 2]
    assert runtime._on_device_bytes == sum(d.nbytes for d in runtime._on_device.values())


@pytest.mark.parametrize("gpus, actors", [(0.1, 10), (0.2, 5), (0.3, 3), (0.5, 2), (1, 1)])
def test_ray_starts_no_more_actors_than_the_gpu_shares_hold(make_spec, monkeypatch, gpus, actors):
    """As Flower's ``pool_size_from_resources`` divides (1 / 0.1 is 10, where 1 // 0.1 is 9.0)."""
    from octomil_sim.config import client_slots, ray_actors
    from octomil_sim.runner import num_nodes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    spec = make_spec("simulation.ray_num_cpus=16", "simulation.num_clients=50", f"simulation.num_gpus_per_client={gpus}")
    assert ray_actors(spec.simulation) == actors == num_nodes(spec)
    cpu = make_spec("simulation.ray_num_cpus=16", "simulation.num_clients=50")  # no GPU share: the CPUs ...
    assert client_slots(cpu.simulation) == 16 == num_nodes(cpu)
    assert ray_actors(cpu.simulation) == 15  # ... one of them the driver's own node (simulation.driver_node)
    assert ray_actors(make_spec("simulation.ray_num_cpus=16", "simulation.driver_node=false").simulation) == 16
    assert ray_actors(make_spec("simulation.backend=local", f"simulation.num_gpus_per_client={gpus}").simulation) == 1


def test_a_cohort_on_a_gpu_may_take_a_quarter_of_its_share_of_the_card(monkeypatch):
    """``cohort_bytes``: 256 MiB on the CPU; on a GPU a quarter of the process's share of the card's memory
    (an 80 GiB card faked), never less than on the CPU."""
    from types import SimpleNamespace

    from octomil_sim import client_app

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    assert cohort_bytes(torch.device("cpu"), 0) == 256 * 2**20 == client_app.COHORT_BYTES
    assert cohort_bytes(torch.device("cuda", 0), 1) == 20 * 2**30
    assert cohort_bytes(torch.device("cuda", 0), 0.5) == 10 * 2**30
    assert cohort_bytes(torch.device("cuda", 0), 0.01) == 256 * 2**20  # 0.25 * 0.8 GiB = 205 MiB < 256 MiB


def test_the_local_backend_gives_back_the_callers_float_modes():
    from octomil_sim.client_app import float_modes
    from octomil_sim.local_backend import in_process_clients

    before = float_modes()
    with in_process_clients():
        torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32  # as a GPU client runtime does
        torch.backends.cudnn.deterministic = not torch.backends.cudnn.deterministic
        assert float_modes() != before
    assert float_modes() == before


# --- on a GPU -------------------------------------------------------------------------------------
def _clients(k: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(5, 60, (k,), generator=g)]
    xs = [torch.randn(n, 6, generator=g).to(device) for n in sizes]
    ys = [torch.randint(0, 3, (n,), generator=g).to(device) for n in sizes]
    return xs, ys


@needs_cuda
@pytest.mark.parametrize("kind", ["epochs", "prox-budget", "listed"])
def test_a_cohort_on_the_gpu_trains_as_each_client_alone(kind):
    """``cohort_sgd`` with data and parameters on ``cuda`` (the plan is drawn on the CPU) against
    ``sgd_epochs`` client by client on ``cuda`` and on the CPU: the same final parameters and losses up to
    float rounding, and the same generator and budget afterwards."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).cuda()
    k = 7
    xs, ys = _clients(k, "cuda")
    starts = [{n: p.detach() + 0.01 * i for n, p in model.named_parameters()} for i in range(k)]
    anchors = [[p.detach() * 0.5 for p in model.parameters()] for _ in range(k)] if kind == "prox-budget" else None
    limits = [3, None, 1, 50, 0, 4, None] if kind == "prox-budget" else [None] * k
    listed = ([BatchStream(len(y), 4).take(5) for y in ys] if kind == "listed" else None)

    def alone(device):
        finals, losses, gens, budgets = [], [], [], []
        for i in range(k):
            m = copy.deepcopy(model).to(device)
            m.load_state_dict(starts[i])
            gen, budget = torch.Generator().manual_seed(i), StepBudget(limits[i])
            loss = sgd_epochs(m, xs[i].to(device), ys[i].to(device), epochs=2, batch_size=8, lr=0.1, generator=gen,
                              anchor=None if anchors is None else [a.to(device) for a in anchors[i]], lam=0.3,
                              budget=budget, batches=None if listed is None else listed[i])
            finals.append({n: v.detach().cpu() for n, v in m.state_dict().items()})
            losses.append(loss), gens.append(gen.get_state()), budgets.append(budget.used)
        return finals, losses, gens, budgets

    gens = [torch.Generator().manual_seed(i) for i in range(k)]
    budgets = [StepBudget(limit) for limit in limits]
    states, losses = cohort_sgd(model, starts, xs, ys, epochs=2, batch_size=8, lr=0.1, generators=gens,
                                anchors=anchors, lam=0.3, budgets=budgets, batches=listed)
    assert all(v.device.type == "cuda" for s in states for v in s.values())
    for device in ("cuda", "cpu"):
        finals, alone_losses, alone_gens, used = alone(device)
        for i in range(k):
            for n, v in finals[i].items():
                torch.testing.assert_close(states[i][n].cpu(), v, rtol=1e-4, atol=1e-5)
            assert losses[i] == pytest.approx(alone_losses[i], rel=1e-4, abs=1e-6)
            assert torch.equal(gens[i].get_state(), alone_gens[i]) and budgets[i].used == used[i]


def _smooth_cnn() -> torch.nn.Module:
    """Convolutions without max-pooling or ReLU: every function of its forward is smooth."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 5, stride=2), nn.Tanh(), nn.Conv2d(16, 32, 5, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


@needs_cuda
@pytest.mark.parametrize("kind", ["leaf-cnn", "smooth-cnn"])
def test_a_cohort_of_convolutions_on_the_gpu_trains_as_each_client_alone(kind):
    """Convolutions train as a cohort on a GPU (``cohort.pays_off`` allows them there, not on the CPU). In
    the float modes of a GPU client process (``FULL_FLOAT32``: no TF32, deterministic cuDNN) ``cohort_sgd``
    on ``cuda`` gives each client's final parameters and loss as ``sgd_epochs`` alone on ``cuda`` and on
    the CPU, up to float rounding, and the same generator state afterwards. The smooth CNN is held to the
    MLP's tolerance. The LEAF CNN's max-pooling and ReLUs turn a rounding difference into another choice
    where two values nearly tie (the gradient then goes elsewhere): against the loop on ``cuda`` it is held
    to the client-half test's tolerance, and against the CPU ten times looser, as the loop on ``cuda``
    itself parts from the CPU. On two H200 machines the largest gaps were 3.1e-4 (cohort vs loop on
    ``cuda``) and 2.3e-4 / 6.1e-4 (loop on ``cuda`` vs the CPU's) for the LEAF CNN, 3e-8 for the smooth one."""
    from octomil_sim.models import FemnistCNN

    tolerance = {"cuda": (1e-3, 1e-4), "cpu": (1e-2, 1e-3)} if kind == "leaf-cnn" else \
        {"cuda": (1e-4, 1e-5), "cpu": (1e-4, 1e-5)}
    old = float_modes(FULL_FLOAT32)
    try:
        torch.manual_seed(0)
        model = (FemnistCNN((1, 28, 28), 10) if kind == "leaf-cnn" else _smooth_cnn()).cuda()
        assert vectorizes(model) and not vectorizes(copy.deepcopy(model).cpu())
        g = torch.Generator().manual_seed(1)
        sizes = [23, 40, 7, 31, 12, 40]
        xs = [torch.rand(n, 1, 28, 28, generator=g).cuda() for n in sizes]
        ys = [torch.randint(0, 10, (n,), generator=g).cuda() for n in sizes]
        starts = [{n: p.detach() + 0.001 * i for n, p in model.named_parameters()} for i in range(len(sizes))]
        gens = [torch.Generator().manual_seed(i) for i in range(len(sizes))]
        states, losses = cohort_sgd(model, starts, xs, ys, epochs=2, batch_size=10, lr=0.05, generators=gens)
        alone = {}
        for device in ("cuda", "cpu"):
            for i in range(len(sizes)):
                m = copy.deepcopy(model).to(device)
                m.load_state_dict(starts[i])
                gen = torch.Generator().manual_seed(i)
                loss = sgd_epochs(m, xs[i].to(device), ys[i].to(device), epochs=2, batch_size=10, lr=0.05,
                                  generator=gen)
                alone[device, i] = ({n: v.detach().cpu() for n, v in m.state_dict().items()}, loss)
                assert torch.equal(gens[i].get_state(), gen.get_state())
        gap = lambda a, b: max((a[n].cpu() - b[n]).abs().max().item() for n in b)  # noqa: E731
        print(f"{kind}: largest parameter gap, cohort vs alone on cuda "
              f"{max(gap(states[i], alone['cuda', i][0]) for i in range(len(sizes))):.1e}, vs alone on the cpu "
              f"{max(gap(states[i], alone['cpu', i][0]) for i in range(len(sizes))):.1e}; alone, cuda vs cpu "
              f"{max(gap(alone['cuda', i][0], alone['cpu', i][0]) for i in range(len(sizes))):.1e}; loss gap "
              f"{max(abs(losses[i] - alone[d, i][1]) for d in ('cuda', 'cpu') for i in range(len(sizes))):.1e}")
        for (device, i), (final, loss) in alone.items():
            rtol, atol = tolerance[device]
            for n, v in final.items():
                torch.testing.assert_close(states[i][n].cpu(), v, rtol=rtol, atol=atol,
                                           msg=lambda m: f"{device} {i} {n}: {m}")
            assert losses[i] == pytest.approx(loss, rel=rtol, abs=1e-6)
    finally:
        float_modes(old)


def _server_config(runtime) -> dict:
    """What the algorithm's server half adds to a train message's config (set by hand here)."""
    from strategies.fedp3 import FedP3Client, layers_in_order
    from strategies.scafflix import ScafflixClient

    if isinstance(runtime.algorithm, ScafflixClient):
        return {"local-steps": 5, "p": 0.3}
    if isinstance(runtime.algorithm, FedP3Client):
        return {"upload": layers_in_order(runtime.template.state_dict())[-1:]}  # the rest is pruned locally
    return {}


def _replies(runtime, rounds: int = 2):
    """Train ``rounds`` messages of 12 clients (each followed by a sync message where the algorithm takes
    one), then one evaluation message; each reply's arrays and metrics."""
    from octomil_sim.client_app import ClientAlgorithm

    out = []
    torch.manual_seed(0)
    model = copy.deepcopy(runtime.template).cpu()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    arrays = ArrayRecord(model.state_dict())
    syncs = type(runtime.algorithm).sync is not ClientAlgorithm.sync
    steps = [(kind, r) for r in range(1, rounds + 1) for kind in ("train", "sync")[:1 + syncs]]
    for kind, server_round in [*steps, ("evaluate", rounds + 1)]:
        config = ConfigRecord({"server-round": server_round, **(_server_config(runtime) if kind != "evaluate" else {})})
        packed = pack([(pid, RecordDict({"arrays": arrays, "config": config})) for pid in range(12)])
        handler = {"train": runtime.train_message,
                   "sync": lambda msg: run_clients(runtime.begin_message().sync, msg),
                   "evaluate": lambda msg: run_clients(runtime.begin_message().evaluate, msg)}[kind]
        replies, failed = unpack(handler(packed))
        out.append(({pid: (r["arrays"].to_torch_state_dict() if "arrays" in r else {}, dict(r["metrics"]))
                     for pid, r in replies.items()}, failed))
    return out


FEMNIST = "<femnist>"  # replaced by a local FEMNIST of 12 writers (tests/femnist_fixture.py)


@needs_cuda
@pytest.mark.parametrize("overrides", [
    ["strategy=fedavg"],
    ["strategy=fedavg", "model=mlp", "system=heterogeneous", "simulation.local_steps=5"],
    ["strategy=ditto", "strategy.client.lam=0.5", "model=mlp"],
    ["strategy=ditto"],  # each client selects its lambda on a validation split
    ["strategy=pfedme"],
    ["strategy=perfedavg"],
    ["strategy=scafflix"],
    ["strategy=fedp3", "model=mlp"],
    ["strategy=personal_layers", "model=mlp", "strategy.client.head_epochs=2"],
    ["strategy=finetune", "fairness=qffl", "model=mlp"],
    ["strategy=maxfl", "strategy.client.local_epochs_rho=3"],
    ["strategy=tilted", "strategy.server.t=2"],
    ["privacy=dp_sgd", "privacy.client.epsilon=null", "privacy.client.noise_multiplier=0"],  # clipping (noise: below)
    ["strategy=prompt_tuning", "dataset=synthetic_tokens", "model=prompt_transformer"],
    ["strategy=fedavg", "dataset=femnist", "model=femnist_cnn", f"dataset.source.path={FEMNIST}"],  # convolutions
], ids=["fedavg", "mlp-steps-hetero", "ditto", "ditto-selecting-lambda", "pfedme", "perfedavg", "scafflix", "fedp3",
        "fedrep", "finetune-qffl", "maxfl", "tilted", "dp-sgd", "prompt-tuning", "femnist-cnn"])
def test_a_client_half_on_the_gpu_replies_as_on_the_cpu(make_spec, tmp_path, overrides):
    """Every reply (uploads, metrics, dropouts) and the stored client state of a GPU runtime (vectorized
    where the algorithm can) equal those of the CPU runtime client by client, up to float rounding."""
    from femnist_fixture import write_femnist

    if any(FEMNIST in o for o in overrides):
        root = str(write_femnist(tmp_path / "femnist", writers=12, per_writer=12))
        overrides = [o.replace(FEMNIST, root) for o in overrides]
    runs = {}
    for device, vectorize in (("cpu", False), ("cuda", True)):
        spec = make_spec(*SMALL, "simulation.state_store=memory", *overrides,
                         f"simulation.num_gpus_per_client={1 if device == 'cuda' else 0}")
        spec = spec.replace(simulation={"vectorize": vectorize, "state_dir": str(tmp_path / device)})
        client_runtime.cache_clear()
        runtime = client_runtime(spec)
        assert runtime.device.type == device and runtime.template.parameters().__next__().device.type == device
        runs[device] = (_replies(runtime), {k: dict(v) for k, v in runtime.store._states.items()})
        if vectorize and vectorizes(runtime.template):
            assert runtime._cohort_works is True  # no silent fallback to client by client
    client_runtime.cache_clear()
    (cpu, cpu_state), (gpu, gpu_state) = runs["cpu"], runs["cuda"]
    for (replies_c, failed_c), (replies_g, failed_g) in zip(cpu, gpu, strict=True):
        assert failed_c == failed_g and sorted(replies_c) == sorted(replies_g)
        assert not failed_c or "system=heterogeneous" in overrides, failed_c  # every client really trained
        for pid, (state_c, metrics_c) in replies_c.items():
            state_g, metrics_g = replies_g[pid]
            assert metrics_c.keys() == metrics_g.keys() and state_c.keys() == state_g.keys()
            for key, value in metrics_c.items():  # an accuracy may differ by one example on the decision boundary
                slack = 1 / metrics_c["num-examples"] + 1e-9 if key.endswith("_acc") else 1e-4
                assert metrics_g[key] == pytest.approx(value, rel=1e-3, abs=slack), (pid, key)
            for name, value in state_c.items():
                torch.testing.assert_close(state_g[name], value, rtol=1e-3, atol=1e-4)
    assert cpu_state.keys() == gpu_state.keys()
    for key, saved in cpu_state.items():
        for name, value in saved.items():
            assert gpu_state[key][name].device.type == "cpu"
            torch.testing.assert_close(gpu_state[key][name].to(value.dtype), value, rtol=1e-3, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("overrides, same_as_cpu", [
    (["strategy=ditto", "model=mlp"], True),
    (["strategy=hierarchical", "strategy.server.assignment=loss", "strategy.server.num_groups=2"], True),
    (["strategy=fedp3", "model=mlp"], True),
    (["privacy=client_level", "privacy.server.clipping=client_fixed", "privacy.server.epsilon=2"], True),
    (["privacy=dp_sgd", "privacy.client.epsilon=2"], False),  # Opacus draws the noise on the GPU: another draw
], ids=["ditto", "hierarchical", "fedp3", "client-level-dp", "dp-sgd"])
def test_a_whole_local_run_on_the_gpu_repeats_exactly_and_matches_the_cpu(make_spec, tmp_path, overrides, same_as_cpu):
    from octomil_sim.runner import run

    common = ["simulation.backend=local", "simulation.num_clients=10", "simulation.clients_per_round=5",
              "simulation.rounds=3", "simulation.fraction_evaluate=0.5", "simulation.checkpoint_every=0",
              "progress=false", *overrides]
    torch.cuda.reset_peak_memory_stats()
    gpu = [run(make_spec(*common, "simulation.num_gpus_per_client=1"), tmp_path / f"gpu{i}") for i in range(2)]
    assert torch.cuda.max_memory_allocated() > 0  # the clients (in this process) trained on the GPU
    drop = lambda d: {k: v for k, v in d.items() if k not in ("time_s", "driver_rss_mb")}  # noqa: E731
    assert [drop(r) for r in gpu[0]["rounds"]] == [drop(r) for r in gpu[1]["rounds"]]
    assert gpu[0]["clients"] == gpu[1]["clients"]
    if same_as_cpu:
        cpu = run(make_spec(*common), tmp_path / "cpu")
        for key in ("global_acc", "personalized_acc", "global_loss", "personalized_loss"):  # (acc: pooled, 1/N a flip)
            assert gpu[0]["final"][key] == pytest.approx(cpu["final"][key], rel=1e-3, abs=5e-3), key
