"""``simulation.vectorize`` (issue 12, goal 4): a train message's clients trained together
(``ClientRuntime.train_message`` -> ``ClientAlgorithm.train_cohort`` -> ``octomil_sim.cohort``) give the
replies the client-by-client path gives, up to float rounding: uploads, metrics, step counts, dropouts,
client state; and the path falls back to client by client where it cannot apply."""

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from octomil_sim.batching import pack, unpack
from octomil_sim.client_app import ClientRuntime, client_runtime

@pytest.fixture(autouse=True)
def every_cohort_trains_together(monkeypatch):
    """These tests compare the cohort path with the loop, so they take it wherever the model allows,
    whatever the CPU cost estimate says (``cohort.CHOOSE_BY_COST``); the estimate's own tests turn it back on."""
    from octomil_sim import cohort

    monkeypatch.setattr(cohort, "CHOOSE_BY_COST", False)


SMALL = ["simulation.num_clients=12", "simulation.clients_per_round=6", "simulation.rounds=3",
         "simulation.checkpoint_every=0", "progress=false"]


def _runtime(make_spec, tmp_path, vectorize: bool, *overrides) -> ClientRuntime:
    spec = make_spec(*SMALL, "simulation.state_store=memory", "simulation.ray_num_cpus=1", *overrides)
    spec = spec.replace(simulation={"vectorize": vectorize, "state_dir": str(tmp_path / "state")})
    client_runtime.cache_clear()  # a fresh state store for each path
    return client_runtime(spec)


def _message(runtime: ClientRuntime, server_round: int, pids=range(12), seed: int = 0) -> RecordDict:
    """A train message for ``pids``, with what the algorithm's server half would add to its config
    (Scafflix: its local steps and probability, as ``strategies.scafflix.Scafflix`` sends them)."""
    from strategies.scafflix import ScafflixClient

    torch.manual_seed(seed)
    model = copy.deepcopy(runtime.template)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    arrays = ArrayRecord(model.state_dict())  # one record shared by every client, as the grid sends it
    extra = {"local-steps": 5, "p": 0.3} if isinstance(runtime.algorithm, ScafflixClient) else {}
    config = ConfigRecord({"server-round": server_round, **extra})
    return pack([(pid, RecordDict({"arrays": arrays, "config": config})) for pid in pids])


def _replies(runtime: ClientRuntime, rounds: int = 2, **kwargs):
    out = []
    for server_round in range(1, rounds + 1):
        replies, failed = unpack(runtime.train_message(_message(runtime, server_round, **kwargs)))
        out.append(({pid: (r["arrays"].to_torch_state_dict(), dict(r["metrics"])) for pid, r in replies.items()},
                    failed))
    return out


def _assert_same(a, b, exact: bool):
    assert len(a) == len(b)
    for (replies_a, failed_a), (replies_b, failed_b) in zip(a, b):
        assert failed_a == failed_b and sorted(replies_a) == sorted(replies_b)
        for pid in replies_a:
            (state_a, metrics_a), (state_b, metrics_b) = replies_a[pid], replies_b[pid]
            assert metrics_a.keys() == metrics_b.keys()
            for key in metrics_a:
                if exact or key in ("num-examples", "partition-id", "local-steps", "sim-time"):
                    assert metrics_a[key] == metrics_b[key], (pid, key)
                else:
                    assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-5, abs=1e-6), (pid, key)
            for name in state_a:
                if exact:
                    assert torch.equal(state_a[name], state_b[name]), (pid, name)
                else:
                    torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    ["strategy=fedavg"],
    ["strategy=fedavg", "model=mlp", "simulation.local_epochs=3"],
    ["strategy=tilted", "strategy.server.t=2"],  # the policy's loss_before, measured once (task.before)
    ["personalization=fedavg", "fairness=qffl", "system=heterogeneous"],  # budgets and dropouts
    ["strategy=fedavg", "simulation.local_steps=7"],  # BatchStream positions carried over rounds
    ["strategy=ditto", "strategy.client.lam=0.5", "model=mlp"],  # personal prox steps, then the global ones
    ["strategy=ditto", "strategy.client.lam=1.0", "simulation.local_steps=5", "system=heterogeneous"],
    ["strategy=maxfl", "strategy.client.local_epochs_rho=3"],  # rho from the local model, then the cohort
    ["personalization=fedavg", "fairness=maxfl", "fairness.client.local_epochs_rho=3"],
], ids=["fedavg", "mlp-3-epochs", "tilted", "qffl-heterogeneous", "local-steps", "ditto", "ditto-steps-hetero",
        "maxfl", "fedavg-with-maxfl-policy"])
def test_a_vectorized_message_equals_client_by_client(make_spec, tmp_path, overrides):
    loop = _runtime(make_spec, tmp_path / "loop", False, *overrides)
    loop_replies = _replies(loop)
    loop_state = {k: dict(v) for k, v in loop.store._states.items()}
    vec = _runtime(make_spec, tmp_path / "vec", True, *overrides)
    assert vec.vectorize and not loop.vectorize
    _assert_same(_replies(vec), loop_replies, exact=False)
    # Ditto's personal models, stream positions: the same state afterwards
    vec_state = {k: dict(v) for k, v in vec.store._states.items()}
    assert vec_state.keys() == loop_state.keys()
    for key in loop_state:
        for name, value in loop_state[key].items():
            torch.testing.assert_close(vec_state[key][name], value, rtol=1e-4, atol=1e-5)


def test_the_cohort_path_is_taken(make_spec, tmp_path, monkeypatch):
    """Not a silent fallback: the vectorized run calls cohort_sgd once per message, never sgd_epochs."""
    import strategies.fedavg as fedavg

    calls = {"cohort": 0, "loop": 0}
    real_cohort, real_loop = fedavg.cohort_sgd, fedavg.sgd_epochs
    monkeypatch.setattr(fedavg, "cohort_sgd", lambda *a, **k: (calls.__setitem__("cohort", calls["cohort"] + 1),
                                                                  real_cohort(*a, **k))[1])
    monkeypatch.setattr(fedavg, "sgd_epochs", lambda *a, **k: (calls.__setitem__("loop", calls["loop"] + 1),
                                                                 real_loop(*a, **k))[1])
    _replies(_runtime(make_spec, tmp_path, True, "strategy=fedavg"))
    assert calls == {"cohort": 2, "loop": 0}


@pytest.mark.parametrize("overrides", [
    ["strategy=ditto"],  # lambda selection: every candidate at every step, client by client
    ["strategy=scafflix"],  # no train_cohort
])
def test_algorithms_without_a_cohort_path_are_bit_for_bit_client_by_client(make_spec, tmp_path, overrides):
    loop = _replies(_runtime(make_spec, tmp_path / "loop", False, *overrides))
    assert all(not failed and len(replies) == 12 for replies, failed in loop)  # every client really trained
    _assert_same(_replies(_runtime(make_spec, tmp_path / "vec", True, *overrides)), loop, exact=True)


def test_a_failing_cohort_reruns_its_clients_one_by_one(make_spec, tmp_path, monkeypatch, capsys):
    import strategies.fedavg as fedavg

    loop = _replies(_runtime(make_spec, tmp_path / "loop", False, "strategy=fedavg", "simulation.local_steps=3"))

    def broken(*args, **kwargs):
        raise RuntimeError("vmap failed")

    monkeypatch.setattr(fedavg, "cohort_sgd", broken)
    again = _replies(_runtime(make_spec, tmp_path / "vec", True, "strategy=fedavg", "simulation.local_steps=3"))
    _assert_same(again, loop, exact=True)  # nothing was consumed by the failed cohort (stream positions too)
    assert "vmap failed" in capsys.readouterr().err


def test_cohorts_are_cut_to_the_memory_budget(make_spec, tmp_path, monkeypatch):
    """A message's clients train in cohorts of as many as ``cohort_bytes`` holds (three copies of the
    model a client), asked for this runtime's device and share (1 for the local backend's process)."""
    import octomil_sim.client_app as client_app
    import strategies.fedavg as fedavg

    sizes, asked = [], []
    real = fedavg.cohort_sgd
    monkeypatch.setattr(fedavg, "cohort_sgd", lambda model, starts, *a, **k: (sizes.append(len(starts)),
                                                                              real(model, starts, *a, **k))[1])
    for backend, share in (("ray", 0), ("local", 1.0)):
        sizes.clear(), asked.clear()
        runtime = _runtime(make_spec, tmp_path / backend, True, "strategy=fedavg", f"simulation.backend={backend}")
        model_bytes = sum(p.numel() * p.element_size() for p in runtime.template.parameters())
        monkeypatch.setattr(client_app, "cohort_bytes",  # five clients a cohort
                            lambda device, gpu_share: (asked.append((device.type, gpu_share)), 3 * model_bytes * 5)[1])
        _replies(runtime, rounds=1)
        assert sizes == [5, 5, 2] and asked == [("cpu", share)]


def test_a_cohort_out_of_memory_halves_the_later_cohorts(make_spec, tmp_path, monkeypatch):
    """A cohort of more than two that runs out of memory (a GPU's activations are not in the budget):
    its clients train one by one, the later cohorts are half its size, and cohorts stay on; the replies
    are the client-by-client runtime's up to float rounding. Any other failure turns cohorts off
    (``test_a_failing_cohort_reruns_its_clients_one_by_one``)."""
    import octomil_sim.client_app as client_app
    import strategies.fedavg as fedavg

    sizes = []
    real = fedavg.cohort_sgd

    def limited(model, starts, *a, **k):
        sizes.append(len(starts))
        if len(starts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a test)")
        return real(model, starts, *a, **k)

    monkeypatch.setattr(fedavg, "cohort_sgd", limited)
    runtime = _runtime(make_spec, tmp_path / "vec", True, "strategy=fedavg")
    model_bytes = sum(p.numel() * p.element_size() for p in runtime.template.parameters())
    monkeypatch.setattr(client_app, "cohort_bytes", lambda device, gpu_share: 3 * model_bytes * 12)
    got = _replies(runtime, rounds=3)
    # round 1: 12 fail (one by one), cap 6; round 2: 6 fail, cap 3, then 3 + 3; round 3: 3 + 3 + 3 + 3
    assert sizes == [12, 6, 3, 3, 3, 3, 3, 3] and runtime._cohort_works is True and runtime._cohort_cap == 3
    _assert_same(got, _replies(_runtime(make_spec, tmp_path / "loop", False, "strategy=fedavg"), rounds=3),
                 exact=False)


@pytest.mark.parametrize("choose_by_cost", [False, True], ids=["cohorts", "as-the-cost-says"])
def test_a_cohorts_reused_models_give_the_replies_of_fresh_copies(make_spec, tmp_path, monkeypatch, choose_by_cost):
    """Where the algorithm reuses models (``reuses_model``), the k-th client of each cohort loads into
    the runtime's k-th model (``model_from(slot=k)``), message after message, instead of a fresh copy
    of the template: the same replies bit for bit, over cohorts cut by the memory budget and over
    messages; with the cost estimate on, a cohort the loop beats trains on the same models."""
    import octomil_sim.client_app as client_app
    from octomil_sim import cohort
    from strategies.fedavg import FedAvgClient

    monkeypatch.setattr(cohort, "CHOOSE_BY_COST", choose_by_cost)

    def run(reuse: bool, kept: int = 5):
        monkeypatch.setattr(FedAvgClient, "reuses_model", reuse)
        runtime = _runtime(make_spec, tmp_path / f"{reuse}-{kept}", True, "strategy=fedavg")
        model_bytes = sum(p.numel() * p.element_size() for p in runtime.template.parameters())
        monkeypatch.setattr(client_app, "COHORT_BYTES", 3 * model_bytes * 5)  # five clients a cohort
        monkeypatch.setattr(client_app, "REUSED_BYTES", kept * model_bytes)  # beyond: fresh copies
        first = _replies(runtime, rounds=1)
        models = list(runtime._reused)
        later = _replies(runtime, rounds=2, seed=1)
        assert [id(m) for m in runtime._reused] == [id(m) for m in models]  # the same models again
        return first + later, len(models)

    reused, slots = run(True)
    copied, none = run(False)
    capped, kept = run(True, kept=2)
    assert slots == 5 and none == 0 and kept == 2
    _assert_same(reused, copied, exact=True)
    _assert_same(capped, copied, exact=True)


@pytest.mark.slow
def test_a_vectorized_run_matches_the_client_by_client_run(make_spec, tmp_path):
    """Through Flower and Ray: the same accuracies and, up to float rounding, the same losses. One
    node, so each round's 12 clients travel in one message, whose step counts make it a cohort even
    with the CPU cost estimate on (checked first: the Ray actors do not see this module's fixture)."""
    from octomil_sim.cohort import cohort_pays, step_counts
    from octomil_sim.data import FederatedData, cache_source
    from octomil_sim.runner import run

    common = ["strategy=fedavg", *SMALL, "simulation.fraction_evaluate=1", "simulation.clients_per_round=12",
              "simulation.num_nodes=1"]
    spec = make_spec(*common)
    cache_source(spec)
    data = FederatedData(spec)
    sizes = [data.num_train(k) for k in range(12)]
    s = spec.simulation
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr("octomil_sim.cohort.CHOOSE_BY_COST", True)
        assert cohort_pays(step_counts(sizes, s.batch_size, s.local_epochs), "cpu"), sizes
    loop = run(make_spec(*common, "simulation.vectorize=false"), tmp_path / "loop")
    vec = run(make_spec(*common, "simulation.vectorize=true"), tmp_path / "vec")
    for a, b in zip(loop["rounds"], vec["rounds"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["global_acc"] == pytest.approx(b["global_acc"], abs=1e-9)
    assert loop["final"]["global_acc"] == pytest.approx(vec["final"]["global_acc"], abs=1e-9)


def test_models_it_would_slow_down_train_client_by_client(monkeypatch):
    """A convolution under vmap is slower than the loop on CPU (cohort.pays_off): the CNN falls back there,
    estimate on or off; off the CPU (here the ``meta`` device) it trains as a cohort. On the CPU, a model
    of more than ``CPU_MAX_PARAMETERS`` parameters (its stacked copies leave the cache) falls back too,
    but not off the CPU or with the estimate off."""
    from octomil_sim import cohort
    from octomil_sim.models import MLP, MLR, FemnistCNN

    assert cohort.vectorizes(MLR((60,), 10)) and cohort.vectorizes(MLP((60,), 10))
    assert not cohort.vectorizes(FemnistCNN((1, 28, 28), 10))
    assert cohort.vectorizes(FemnistCNN((1, 28, 28), 10).to("meta"))
    conv1d = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    assert not cohort.vectorizes(conv1d) and cohort.vectorizes(conv1d.to("meta"))
    big = MLP((784,), 10, (200,))  # 159,010 parameters
    at_the_cap, over = MLR((cohort.CPU_MAX_PARAMETERS - 1,), 1), MLR((cohort.CPU_MAX_PARAMETERS,), 1)  # n + 1
    assert sum(p.numel() for p in at_the_cap.parameters()) == cohort.CPU_MAX_PARAMETERS
    assert cohort.vectorizes(big) and cohort.vectorizes(over)  # the estimate is off in this module
    monkeypatch.setattr(cohort, "CHOOSE_BY_COST", True)
    assert not cohort.vectorizes(big) and not cohort.vectorizes(over)
    assert cohort.vectorizes(at_the_cap) and cohort.vectorizes(MLP((60,), 10, (200,)))
    assert cohort.vectorizes(big.to("meta"))
    cnn = FemnistCNN((1, 28, 28), 10)
    assert not cohort.vectorizes(cnn) and cohort.vectorizes(cnn.to("meta"))
    transposed = torch.nn.Sequential(torch.nn.ConvTranspose2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(50, 3))
    assert not cohort.vectorizes(transposed.to("meta"))  # not tested under vmap: client by client
    assert not cohort.vectorizes(torch.nn.Sequential(torch.nn.ReLU()))  # no parameters: nothing to stack


def test_the_cost_estimate_by_hand(monkeypatch):
    """``cohort_pays`` on counts worked out by hand: the loop costs sum(counts) steps, the cohort 3.3 per
    step shared by two or more clients and 1.4 per step of the longest client alone."""
    from octomil_sim import cohort

    monkeypatch.setattr(cohort, "CHOOSE_BY_COST", True)
    assert not cohort.cohort_pays([40], "cpu")  # one client: nothing to share
    assert not cohort.cohort_pays([10, 10], "cpu")  # 20 < 33
    assert not cohort.cohort_pays([10, 10, 10], "cpu")  # 30 < 33
    assert cohort.cohort_pays([10, 10, 10, 10], "cpu")  # 40 > 33
    assert not cohort.cohort_pays([40, 5, 5, 5, 5], "cpu")  # 60 < 3.3 * 5 + 1.4 * 35 = 65.5
    assert cohort.cohort_pays([40, 10, 10, 10, 10], "cpu")  # 80 > 3.3 * 10 + 1.4 * 30 = 75
    assert cohort.cohort_pays([40] * 10, "cpu")  # 400 > 132
    assert cohort.cohort_pays([10, 10], "meta")  # off the CPU any cohort of two or more
    monkeypatch.setattr(cohort, "CHOOSE_BY_COST", False)
    assert cohort.cohort_pays([10, 10], "cpu") and not cohort.cohort_pays([10], "cpu")


@pytest.mark.parametrize("limit", [None, 7])
@pytest.mark.parametrize("listed", [False, True])
def test_step_counts_are_the_steps_taken(limit, listed):
    """``step_counts`` (known before any draw) is what ``cohort_sgd`` then counts into each budget."""
    from octomil_sim.cohort import cohort_sgd, step_counts
    from octomil_sim.models import MLR
    from octomil_sim.training import BatchStream, StepBudget

    sizes = [3, 20, 41, 9]
    xs, ys = [torch.randn(n, 4) for n in sizes], [torch.randint(0, 3, (n,)) for n in sizes]
    budgets = [StepBudget(limit) for _ in sizes]
    for b, used in zip(budgets, (0, 2, 5, 9)):
        b.used = used if limit is not None else 0
    batches = [BatchStream(n, 4).take(6) for n in sizes] if listed else None
    counts = step_counts(sizes, 4, 2, budgets, batches)
    expected = [6] * 4 if listed else [2, 10, 22, 6]  # 2 epochs of ceil(n / 4) minibatches
    if limit is not None:
        expected = [min(e, max(limit - used, 0)) for e, used in zip(expected, (0, 2, 5, 9))]
    assert counts == expected
    before = [b.used for b in budgets]
    model = MLR((4,), 3)
    cohort_sgd(model, [model.state_dict()] * 4, xs, ys, epochs=2, batch_size=4, lr=0.1,
               generators=[torch.Generator().manual_seed(k) for k in range(4)], budgets=budgets, batches=batches)
    assert [b.used - u for b, u in zip(budgets, before)] == counts


@pytest.mark.parametrize("overrides", [
    ["strategy=fedavg"],
    ["personalization=fedavg", "fairness=qffl", "system=heterogeneous"],  # budgets and dropouts
    ["strategy=ditto", "strategy.client.lam=1.0", "simulation.local_steps=5", "system=heterogeneous"],
], ids=["fedavg", "qffl-heterogeneous", "ditto-steps-hetero"])
def test_a_cohort_the_loop_beats_trains_client_by_client_bit_for_bit(make_spec, tmp_path, monkeypatch, overrides):
    """With the estimate on, messages of three clients (never worth a cohort on the CPU: 3 n < 3.3 n)
    take the loop: no cohort_sgd call, and every reply and stored state equals vectorize=false exactly."""
    from octomil_sim import cohort
    import strategies.fedavg as fedavg

    monkeypatch.setattr(cohort, "CHOOSE_BY_COST", True)
    calls = []
    real = fedavg.cohort_sgd
    monkeypatch.setattr(fedavg, "cohort_sgd", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    loop = _runtime(make_spec, tmp_path / "loop", False, *overrides)
    loop_replies = _replies(loop, pids=[2, 5, 9])
    vec = _runtime(make_spec, tmp_path / "vec", True, *overrides)
    _assert_same(_replies(vec, pids=[2, 5, 9]), loop_replies, exact=True)
    assert not calls
    for key, state in loop.store._states.items():
        for name, value in state.items():
            assert torch.equal(vec.store._states[key][name], value), (key, name)


@pytest.mark.parametrize("overrides", [["strategy=maxfl", "strategy.client.local_epochs_rho=3"],
                                       ["personalization=fedavg", "fairness=maxfl", "fairness.client.local_epochs_rho=3"]])
def test_a_model_that_fails_under_vmap_is_found_before_anything_is_trained(make_spec, tmp_path, caplog, overrides):
    """A forward with ``.item()`` passes ``vectorizes`` but not ``vmap``: the probe sends the run client by
    client before any state (MaxFL's local models) is written, so it equals vectorize=false bit for bit."""
    model = ["model.net._target_=fault_clients.ItemMLR"]
    loop = _replies(_runtime(make_spec, tmp_path / "loop", False, *model, *overrides))
    vec_runtime = _runtime(make_spec, tmp_path / "vec", True, *model, *overrides)
    _assert_same(_replies(vec_runtime), loop, exact=True)
    assert vec_runtime._cohort_works is False
    assert "does not train under torch.func.vmap" in caplog.text
