"""``simulation.backend=local`` (issue 12): Flower's simulation runtime with the ClientApp in the driver's
process. Whole runs here take a second or two (no Ray); the comparison with the Ray backend is slow."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.server.superlink.fleet.vce import vce_api

from octomil_sim.batching import pack, unpack
from octomil_sim.client_app import client_runtime
from octomil_sim.config import validate
from octomil_sim.errors import ConfigError
from octomil_sim.local_backend import LocalBackend, in_process_clients
from octomil_sim.runner import initial_arrays, num_nodes, run

MEASURED = {"time_s", "driver_rss_mb"}  # wall time and memory: the only numbers a seed does not fix
LOCAL = ["simulation.backend=local", "progress=false"]


def _numbers(results: dict) -> tuple:
    drop = lambda d: {k: v for k, v in d.items() if k not in MEASURED}  # noqa: E731
    return [drop(r) for r in results["rounds"]], results["clients"], drop(results["final"])


def test_a_local_run_twice_in_one_process_gives_the_same_numbers(make_spec, tmp_path):
    """The memory store lives in this process with the local backend: a second run of the same spec
    must start from nothing (the runtime cache is cleared), or Ditto's personal models of the first
    run would carry over."""
    import ray

    overrides = [*LOCAL, "strategy=ditto", "strategy.client.lam=0.5", "simulation.num_clients=8",
                 "simulation.clients_per_round=4", "simulation.rounds=3", "simulation.fraction_evaluate=0.5",
                 "simulation.state_store=memory", "simulation.checkpoint_every=0"]
    saved = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller's setting (the client runtime sets 1 for its clients)
    try:
        first = run(make_spec(*overrides), tmp_path / "a")
        second = run(make_spec(*overrides), tmp_path / "b")
        assert torch.get_num_threads() == 3  # the client runtime's one thread is not left behind
    finally:
        torch.set_num_threads(saved)
    assert _numbers(first) == _numbers(second)
    assert first["final"]["personalized_acc"] != first["final"]["global_acc"]  # Ditto's personal models were used
    assert not ray.is_initialized()  # no Ray at all
    assert vce_api.run_api.__name__ == "run_api"  # Flower's runtime as it was


def test_a_resumed_local_run_equals_one_run_straight_through(make_spec, tmp_path):
    common = [*LOCAL, "strategy=fedavg", "simulation.num_clients=8", "simulation.clients_per_round=4",
              "simulation.fraction_evaluate=0.5", "simulation.checkpoint_every=1"]
    straight = run(make_spec(*common, "simulation.rounds=4"), tmp_path / "straight")
    run(make_spec(*common, "simulation.rounds=2"), tmp_path / "resumed")
    resumed = run(make_spec(*common, "simulation.rounds=4"), tmp_path / "resumed")
    assert _numbers(resumed) == _numbers(straight)
    saved = json.loads((tmp_path / "resumed" / "checkpoint" / "round_000004" / "state.json").read_text())
    assert [r["round"] for r in saved["state"]["rows"]] == [1, 2, 3, 4]
    # resumed with checkpoints off: the same numbers, and nothing written past the checkpoint it resumed from
    run(make_spec(*common, "simulation.rounds=2"), tmp_path / "unsaved")
    before = sorted(p.name for p in (tmp_path / "unsaved" / "checkpoint").iterdir())
    unsaved = run(make_spec(*common[:-1], "simulation.checkpoint_every=0", "simulation.rounds=4"), tmp_path / "unsaved")
    assert _numbers(unsaved) == _numbers(straight)
    assert sorted(p.name for p in (tmp_path / "unsaved" / "checkpoint").iterdir()) == before


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=ditto", "strategy.client.lam=0.5"],
                                      ["strategy=finetune", "fairness=qffl", "model=mlp"]])
def test_the_local_backend_gives_the_ray_backends_numbers(make_spec, tmp_path, strategy):
    """Same messages (two nodes, as two Ray actors would serve), same numbers: only where the
    ClientApp runs changes. Vectorized cohorts included (they follow the messages); fine-tuning's
    clients reuse one model, its evaluation personalizes, q-FFL's server takes norms."""
    common = [*strategy, "simulation.num_clients=10",
              "simulation.clients_per_round=6", "simulation.rounds=3", "simulation.fraction_evaluate=0.5",
              "simulation.ray_num_cpus=2", "progress=false"]
    ray_run = run(make_spec(*common), tmp_path / "ray")
    local = run(make_spec(*common, "simulation.backend=local", "simulation.num_nodes=2"), tmp_path / "local")
    assert _numbers(local) == _numbers(ray_run)


@pytest.mark.slow
def test_the_drivers_own_node_gives_the_numbers_of_an_actor_in_its_place(make_spec, tmp_path, monkeypatch):
    """``simulation.driver_node`` (the default): on 2 CPUs the driver serves one of the two nodes and
    Ray starts one actor; the numbers are those of two actors (``driver_node=false``). Ditto's
    personal models live in the disk store, which both processes read and write."""
    from octomil_sim import local_ray

    seen = {"here": 0}
    make_backend = local_ray.driver_node_backend

    def recording(config):
        make = make_backend(config)

        def backend():
            b = make()
            build, local = b.build, b.local.process_message

            def built(app_fn):
                build(app_fn)
                seen["actors"], seen["workers"] = b.pool.num_actors, b.num_workers

            def here(message, context):
                seen["here"] += 1
                return local(message, context)

            b.build, b.local.process_message = built, here
            return b
        return backend

    monkeypatch.setattr(local_ray, "driver_node_backend", recording)
    common = ["strategy=ditto", "strategy.client.lam=0.5", "simulation.num_clients=10",
              "simulation.clients_per_round=6", "simulation.rounds=3", "simulation.fraction_evaluate=0.5",
              "simulation.ray_num_cpus=2", "progress=false"]
    actors = run(make_spec(*common, "simulation.driver_node=false"), tmp_path / "actors")
    assert seen == {"here": 0}  # no driver node: the backend is Flower's own
    driver = run(make_spec(*common), tmp_path / "driver")
    assert seen["actors"] == 1 and seen["workers"] == 2 and seen["here"] >= 1
    assert _numbers(driver) == _numbers(actors)


def test_local_backend_runs_the_app_here_and_reports_its_errors_as_flower_does():
    seen = []

    def app(message, context):
        seen.append((message, context))
        if message == "bad":
            raise ValueError("boom")
        return "reply"

    def exits(message, context):
        raise SystemExit(3)  # would end Flower's worker thread, and the run would wait for ever

    backend = LocalBackend({})
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    assert backend.process_message("hello", "ctx") == ("reply", "ctx")
    with pytest.raises(ClientAppException, match="boom"):
        backend.process_message("bad", "ctx")
    assert seen == [("hello", "ctx"), ("bad", "ctx")]
    backend.build(lambda: exits)
    with pytest.raises(ClientAppException):
        backend.process_message("hello", "ctx")


def test_the_clients_run_on_one_torch_thread_and_the_server_keeps_its_own():
    """As a Ray actor's (one thread) and the driver's: torch splits large reductions by thread count."""
    inside = []
    backend = LocalBackend({})
    backend.build(lambda: lambda message, context: inside.append(torch.get_num_threads()) or "reply")
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        backend.process_message("hello", "ctx")
        assert inside == [1] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)


def test_in_process_clients_clears_the_runtime_and_restores_flower(make_spec, tmp_path):
    spec = make_spec("simulation.num_clients=4", "simulation.clients_per_round=2", "simulation.state_store=memory",
                     "simulation.ray_num_cpus=1", f"simulation.state_dir={tmp_path}")
    before = client_runtime(spec)
    saved, run_api = torch.get_num_threads(), vce_api.run_api
    torch.set_num_threads(3)
    try:
        with in_process_clients():
            assert vce_api.run_api is not run_api
            inside = client_runtime(spec)
            assert inside is not before  # a run starts from a fresh runtime, as on fresh actors
            with pytest.raises(RuntimeError, match="another run with the local backend"):
                with in_process_clients():
                    pass
        assert vce_api.run_api is run_api and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)
    assert client_runtime(spec) is not inside  # and leaves none behind
    client_runtime.cache_clear()


@pytest.mark.parametrize("overrides, message", [
    (["simulation.backend=threads"], "simulation.backend='threads': allowed: ray"),
    (["simulation.backend=local", "simulation.ray_address=auto"], "simulation.backend='local': allowed: ray when"),
])
def test_bad_backend_settings_name_the_key(make_spec, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_spec(*overrides))


def test_the_memory_store_and_one_node_with_the_local_backend(make_spec):
    """One process holds every client: the memory store needs no single-actor setting there, and the
    round is one message (the backend runs one message at a time)."""
    spec = make_spec("simulation.backend=local", "simulation.state_store=memory", "simulation.checkpoint_every=0",
                     "simulation.ray_num_cpus=2")
    validate(spec)
    assert num_nodes(spec) == 1
    with pytest.raises(ConfigError, match="simulation.state_store='memory'"):
        validate(make_spec("simulation.state_store=memory", "simulation.checkpoint_every=0", "simulation.ray_num_cpus=2"))


def test_train_reuses_one_model_only_where_the_algorithm_allows(make_spec, tmp_path, monkeypatch):
    """FedAvg's clients load into one model (``reuses_model``); the replies are those of a fresh copy
    per client, bit for bit. Ditto keeps a copy per client."""
    from strategies.fedavg import FedAvgClient

    def replies(reuse: bool, *overrides):
        monkeypatch.setattr(FedAvgClient, "reuses_model", reuse)
        spec = make_spec("strategy=fedavg", "simulation.num_clients=6", "simulation.clients_per_round=6",
                         "simulation.state_store=memory",
                         "simulation.ray_num_cpus=1", "simulation.vectorize=false", f"simulation.state_dir={tmp_path}",
                         *overrides)
        client_runtime.cache_clear()
        runtime = client_runtime(spec)
        arrays = initial_arrays(spec)  # (the template's own weights are not seeded)
        out = []
        for server_round in (1, 2):
            packed = pack([(pid, RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}))
                           for pid in range(6)])
            contents, _ = unpack(runtime.train_message(packed))
            out.append({pid: (c["arrays"].to_torch_state_dict(), dict(c["metrics"])) for pid, c in contents.items()})
        model_a = runtime.model_from(arrays, runtime.task(RecordDict(), 0, salt=0), reuse=True)
        model_b = runtime.model_from(arrays, runtime.task(RecordDict(), 1, salt=0), reuse=True)
        client_runtime.cache_clear()
        return out, model_a is model_b

    reused, shared = replies(True)
    copied, not_shared = replies(False)
    assert shared and not not_shared
    for a, b in zip(reused, copied):
        assert a.keys() == b.keys()
        for pid in a:
            assert a[pid][1] == b[pid][1]
            assert all(torch.equal(a[pid][0][k], b[pid][0][k]) for k in a[pid][0])
    _, ditto_shared = replies(True, "strategy=ditto")
    assert not ditto_shared


def test_a_subclass_that_does_not_declare_reuse_gets_a_copy(make_spec, tmp_path):
    from strategies.fedavg import FedAvgClient

    class OwnTrain(FedAvgClient):  # says nothing of reuse: it may keep the model
        pass

    spec = make_spec("strategy=fedavg", "simulation.num_clients=4", "simulation.clients_per_round=2",
                     "simulation.state_store=memory", "simulation.ray_num_cpus=1", f"simulation.state_dir={tmp_path}")
    client_runtime.cache_clear()
    runtime = client_runtime(spec)
    arrays = initial_arrays(spec)
    task = runtime.task(RecordDict(), 0, salt=0)
    assert runtime.model_from(arrays, task, reuse=True) is runtime.model_from(arrays, task, reuse=True)
    runtime.algorithm = OwnTrain()
    assert runtime.model_from(arrays, task, reuse=True) is not runtime.model_from(arrays, task, reuse=True)
    client_runtime.cache_clear()


def test_an_evaluation_message_loads_the_shared_model_once_with_the_same_numbers(make_spec, tmp_path, monkeypatch):
    """The clients of one evaluation message share the received record: the reused model is loaded
    for the first and evaluated as is by the others (fine-tuning personalizes copies of its own);
    the numbers are those of a fresh copy per client. The next message loads again."""
    from octomil_sim.client_app import ClientAlgorithm, run_clients
    from strategies.finetune import FineTuneClient

    loads = []
    load = ClientAlgorithm.load
    monkeypatch.setattr(ClientAlgorithm, "load",
                        lambda self, model, arrays, task: loads.append(id(model)) or load(self, model, arrays, task))

    def evaluate(reuse: bool):
        monkeypatch.setattr(FineTuneClient, "reuses_model", reuse)
        spec = make_spec("strategy=finetune", "simulation.num_clients=6", "simulation.clients_per_round=6",
                         "simulation.state_store=memory", "simulation.ray_num_cpus=1", f"simulation.state_dir={tmp_path}")
        client_runtime.cache_clear()
        runtime, arrays = client_runtime(spec), initial_arrays(spec)
        out = []
        for server_round in (1, 2):  # the same record object both times: each message loads it once
            packed = pack([(pid, RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}))
                           for pid in range(6)])
            loads.clear()
            contents, _ = unpack(run_clients(runtime.begin_message().evaluate, packed))
            out.append(({pid: dict(c["metrics"]) for pid, c in contents.items()}, list(loads)))
        client_runtime.cache_clear()
        return out

    reused, copied = evaluate(True), evaluate(False)
    for (metrics_r, loads_r), (metrics_c, loads_c) in zip(reused, copied):
        assert metrics_r == metrics_c
        assert len(loads_c) == 12  # a global and a personal copy for each of the 6 clients
        assert len(loads_r) == 7 and loads_r[0] not in loads_r[1:]  # the shared global model once, 6 personal copies


def test_a_local_run_needs_no_ray_installed(make_spec, tmp_path, monkeypatch):
    """Flower's ``run_simulation`` exits when its backend is named ``ray`` and Ray cannot be found; a local run
    names its own backend, so a machine without Ray (e.g. a GPU box with torch alone) runs it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    out = run(make_spec(*LOCAL, "simulation.num_clients=6", "simulation.clients_per_round=3", "simulation.rounds=2",
                        "simulation.checkpoint_every=0"), tmp_path)
    assert [r["round"] for r in out["rounds"]] == [1, 2]



@pytest.mark.parametrize("nodes", [1, 2])
def test_an_evaluation_sent_with_the_next_training_gives_the_numbers_of_two_exchanges(make_spec, tmp_path,
                                                                                   monkeypatch, nodes):
    """``run_rounds`` sends round t's evaluation with round t + 1's training. Ditto's evaluation reads
    each client's personal model and its training rewrites it, and a client may be both evaluated and
    trained in one exchange: the numbers (bytes and failures per round included) must be those of a run
    whose checkpoint after every round keeps each evaluation in its own exchange. A round's evaluation
    goes alone before a checkpoint and after the last round."""
    from octomil_sim.server_app import SimulationGrid

    fused = []
    evaluate_then_train = SimulationGrid.evaluate_then_train

    def counted(self, evaluate, train, **kwargs):
        fused.append(sorted({m.metadata.dst_node_id for m in evaluate} & {m.metadata.dst_node_id for m in train}))
        return evaluate_then_train(self, evaluate, train, **kwargs)

    monkeypatch.setattr(SimulationGrid, "evaluate_then_train", counted)
    common = [*LOCAL, "strategy=ditto", "strategy.client.lam=0.5", "simulation.num_clients=8",
              "simulation.clients_per_round=5", "simulation.rounds=6", "simulation.fraction_evaluate=0.5",
              f"simulation.num_nodes={nodes}", "system=heterogeneous"]
    separate = run(make_spec(*common, "simulation.checkpoint_every=1"), tmp_path / "separate")
    assert fused == []
    together = run(make_spec(*common, "simulation.checkpoint_every=4"), tmp_path / "together")
    assert len(fused) == 4  # rounds 1, 2, 3 and 5 (4 checkpoints, 6 is the last)
    assert any(fused)  # some client was evaluated and trained in one exchange
    assert _numbers(together) == _numbers(separate)
    assert any(r["failed_clients"] for r in separate["rounds"])  # the system model drops clients: counted per round


def test_a_local_run_maps_the_clients_file_and_a_later_run_opens_no_partition(make_spec, tmp_path, monkeypatch):
    """A generated dataset's clients come from the clients file on the local backend too: the first run
    writes it in its data check, a second run with the same data finds it and never opens the partitions
    (``FederatedData`` is not even built), with the same numbers; without the file (``clients_file`` None,
    as for a hub dataset) the partitions give them too."""
    from octomil_sim import client_data, data, runner

    monkeypatch.setenv("OCTOMIL_SIM_CACHE", str(tmp_path / "cache"))
    overrides = [*LOCAL, "strategy=qffl", "simulation.num_clients=8", "simulation.clients_per_round=4",
                 "simulation.rounds=2", "simulation.checkpoint_every=0"]  # q-FFL: client sizes for its sampling
    first = run(make_spec(*overrides), tmp_path / "a")
    assert len(list((client_data.cache_root() / "clients").iterdir())) == 1
    with monkeypatch.context() as patched:
        def refused(*args, **kwargs):
            raise AssertionError("the partitions were opened")

        patched.setattr(data.FederatedData, "__init__", refused)
        second = run(make_spec(*overrides), tmp_path / "b")
    assert _numbers(second) == _numbers(first)
    monkeypatch.setattr(runner, "clients_file", lambda spec: None)
    assert _numbers(run(make_spec(*overrides), tmp_path / "c")) == _numbers(first)
