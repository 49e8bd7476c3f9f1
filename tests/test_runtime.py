"""The runtime pieces added for scale and robustness: packing clients into Flower messages, the
system model, checkpoints."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from octomil_sim.batching import pack, pack_pair, split_by_work, split_even, unpack, unpack_pair
from octomil_sim.checkpoint import load_checkpoint, restore_client_state, save_checkpoint
from octomil_sim.errors import ConfigError
from octomil_sim.system import SystemModel
from octomil_sim.training import StepBudget, sgd_epochs


def test_pack_unpack_round_trip_sends_a_shared_record_once():
    shared = ArrayRecord([np.arange(1000, dtype=np.float32)])
    own = ConfigRecord({"server-round": 3})
    contents = [(4, RecordDict({"arrays": shared, "config": own})),
                (9, RecordDict({"arrays": shared, "config": ConfigRecord({"server-round": 3})}))]
    packed = pack(contents, failures=[(5, "dropped")])
    assert len(packed.array_records) == 1  # the model travels once for both clients
    back, failed = unpack(packed)
    assert sorted(back) == [4, 9] and failed == {5: "dropped"}
    np.testing.assert_array_equal(back[9]["arrays"].to_numpy_ndarrays()[0], np.arange(1000))
    assert back[9]["config"]["server-round"] == 3


def test_pack_pair_keeps_a_client_in_both_lists_and_their_shared_model_once():
    model = ArrayRecord([np.arange(1000, dtype=np.float32)])
    evaluate = [(2, RecordDict({"arrays": model})), (4, RecordDict({"arrays": model}))]
    train = [(4, RecordDict({"arrays": model, "config": ConfigRecord({"server-round": 5})}))]
    packed = pack_pair(evaluate, train, evaluate_failures=[(7, "dropped")], train_failures=[(1, "error")])
    assert len(packed.array_records) == 1  # one model for the three contents
    (e, e_failed), (t, t_failed) = unpack_pair(packed)
    assert sorted(e) == [2, 4] and sorted(t) == [4] and e_failed == {7: "dropped"} and t_failed == {1: "error"}
    assert "config" not in e[4] and t[4]["config"]["server-round"] == 5  # client 4's two contents, each its own
    assert unpack_pair(pack_pair([], train))[0] == ({}, {})


def test_evaluate_then_train_places_each_client_with_its_training_and_counts_the_training_late(monkeypatch):
    """One exchange for an evaluation and the next round's training (``run_rounds``): the training goes
    to the nodes a training exchange would use, an evaluated client that trains goes to its training
    node (its evaluation then runs before its training there), the others fill the emptier nodes, and
    the training's bytes are counted only when its replies are taken."""
    from flwr.app import Message, MessageType, MetricRecord
    from flwr.supercore.task_identity import TaskIdentity

    from octomil_sim.batching import for_driver
    from octomil_sim.server_app import EVALUATE_THEN_TRAIN, SimulationGrid

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    model = ArrayRecord([np.zeros(10, dtype=np.float32)])
    size = model.count_bytes()
    seen: dict[int, tuple[list[int], list[int]]] = {}
    marked: dict[int, bool] = {}

    class Nodes:  # serves every node's message at once, as a node's ClientApp would
        def __init__(self):
            self.replies = []

        def push_messages(self, messages):
            ids = []
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's grid names a pushed message
                assert m.metadata.message_type == EVALUATE_THEN_TRAIN
                (e, _), (t, _) = unpack_pair(m.content)
                seen[m.metadata.dst_node_id] = (sorted(e), sorted(t))
                marked[m.metadata.dst_node_id] = for_driver(m.content)
                reply = lambda c: RecordDict({"arrays": model, "metrics": MetricRecord({"local-steps": 10 * c})})  # noqa: E731
                content = pack_pair([(c, reply(c)) for c in e if c != 6], [(c, reply(c)) for c in t],
                                    evaluate_failures=[(6, "dropped")] if 6 in e else [])
                self.replies.append(Message(content, reply_to=m))
                ids.append(f"m{i}")
            return ids

        def pull_messages(self, ids):
            out, self.replies = self.replies, []
            return out

    grid = SimulationGrid(Nodes(), num_clients=10)
    grid.nodes = [101, 102]
    grid.work = {1: 5.0, 3: 1.0, 5: 1.0, 7: 1.0}  # client 1 alone is as much work as the other three
    content = RecordDict({"arrays": model})
    message = lambda c, kind: Message(content, dst_node_id=c, message_type=kind)  # noqa: E731
    evaluate = [message(c, MessageType.EVALUATE) for c in (0, 2, 3, 6, 8)]
    train = [message(c, MessageType.TRAIN) for c in (1, 3, 5, 7)]
    evaluated, training = grid.evaluate_then_train(evaluate, train)
    # training as ``split_by_work``: [1] and [3, 5, 7]; evaluated client 3 with its training, the rest to the emptier
    assert seen == {101: ([0, 2, 8], [1]), 102: ([3, 6], [3, 5, 7])}
    assert marked == {101: False, 102: False}  # no driver's node: no message marked for it
    assert [m.metadata.reply_to_message_id for m in evaluated] == [m.metadata.message_id for m in evaluate]
    assert [m.has_error() for m in evaluated] == [False, False, False, True, False]
    assert sum(grid.failed.values()) == 0 and grid.last_failure == {6: "dropped"}  # an evaluation's failure is no training's
    assert dict(grid.bytes) == {"evaluate_down": 5 * size, "evaluate_up": 4 * size}
    trained = training()
    assert [m.content["metrics"]["local-steps"] for m in trained] == [10, 30, 50, 70]
    assert dict(grid.bytes) == {"evaluate_down": 5 * size, "evaluate_up": 4 * size,
                                "train_down": 4 * size, "train_up": 4 * size}
    assert grid.work[5] == 50.0
    with pytest.raises(ValueError, match="evaluate messages, then train messages"):
        grid.evaluate_then_train(train, evaluate)

    # the driver serves a node (``driver_node``): the message with the most training work is marked for
    # it and takes every client only evaluated; a client that also trains stays with its training
    grid = SimulationGrid(Nodes(), num_clients=10, driver_node=True)
    grid.nodes, grid.work = [101, 102], {1: 5.0, 3: 1.0, 5: 1.0, 7: 1.0}
    evaluated, training = grid.evaluate_then_train(evaluate, train)
    assert seen == {101: ([0, 2, 6, 8], [1]), 102: ([3], [3, 5, 7])} and marked == {101: True, 102: False}
    assert [m.has_error() for m in evaluated] == [False, False, False, True, False]
    seen.clear(), marked.clear()
    grid.work = {1: 3.0, 3: 2.0, 5: 2.0}  # split [1] and [3, 5]: the second share is the heavier
    grid.evaluate_then_train(evaluate, train[:3])
    assert seen == {101: ([], [1]), 102: ([0, 2, 3, 6, 8], [3, 5])} and marked == {101: False, 102: True}
    seen.clear(), marked.clear()
    grid.evaluate_then_train(evaluate, train[:1])  # one node trains: on two nodes its message takes every evaluation
    assert seen == {101: ([0, 2, 3, 6, 8], [1])} and marked == {101: True}  # (an empty message is not sent)
    seen.clear(), marked.clear()
    grid.nodes, grid.work = [101, 102, 103], {1: 3.0, 3: 1.0, 5: 1.0}  # three nodes: at most twice an even share
    grid.evaluate_then_train([message(c, MessageType.EVALUATE) for c in (0, 2, 4, 6, 8, 9)], train[:3])
    assert seen == {101: ([0, 2, 4, 6], [1]), 102: ([8], [3]), 103: ([9], [5])}
    assert marked == {101: True, 102: False, 103: False}


def test_a_training_that_fails_whole_keeps_the_evaluation_of_its_message():
    """``client_app.evaluate_then_train``: a train message that fails as a whole fails its clients,
    and the evaluation sent with it still replies (two exchanges would have kept it too)."""
    from flwr.app import MetricRecord

    from octomil_sim.client_app import evaluate_then_train

    class Runtime:
        order = []

        def evaluate(self, pid, content):
            self.order.append(("evaluate", pid))
            return RecordDict({"metrics": MetricRecord({"acc": float(pid)})})

        def train_clients(self, contents):
            self.order.append(("train", sorted(contents)))
            raise RuntimeError("out of memory")

    model = ArrayRecord([np.zeros(3, dtype=np.float32)])
    reply = evaluate_then_train(Runtime(), pack_pair([(1, RecordDict({"arrays": model})), (2, RecordDict({"arrays": model}))],
                                                     [(2, RecordDict({"arrays": model}))]))
    (evaluated, evaluate_failed), (trained, train_failed) = unpack_pair(reply)
    assert Runtime.order == [("evaluate", 1), ("evaluate", 2), ("train", [2])]  # the evaluation first
    assert {c: r["metrics"]["acc"] for c, r in evaluated.items()} == {1: 1.0, 2: 2.0} and evaluate_failed == {}
    assert trained == {} and train_failed == {2: "RuntimeError: out of memory"}


def test_run_rounds_refuses_a_configure_train_that_exchanges_while_an_evaluation_waits(task_identity):
    from flwr.app import Message, MessageType

    from octomil_sim.server_app import run_rounds

    class Grid:
        exchanges = 0

        def send_and_receive(self, messages):
            self.exchanges += 1
            return []

    class Strategy:
        def configure_train(self, server_round, arrays, config, grid):
            if server_round == 2:
                grid.send_and_receive([])  # e.g. a control message before training
            return [Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)]

        def aggregate_train(self, server_round, replies):
            return None, None

        def configure_evaluate(self, server_round, arrays, config, grid):
            return [Message(RecordDict(), dst_node_id=0, message_type=MessageType.EVALUATE)]

        def aggregate_evaluate(self, server_round, replies):
            return None

    rounds = []
    with pytest.raises(RuntimeError, match=r"^Strategy.configure_train exchanged messages with the clients while "
                                           r"round 1's evaluation waited to go with round 2's training"):
        run_rounds(Strategy(), Grid(), ArrayRecord(), 1, 3, lambda r, *args: rounds.append(r))
    assert rounds == []
    # with a checkpoint after every round nothing waits, and the same strategy runs
    assert run_rounds(Strategy(), Grid(), ArrayRecord(), 1, 3, lambda r, *args: rounds.append(r),
                      checkpoints_after=lambda r: True)[1] == 3 and rounds == [1, 2, 3]


def test_early_actors_wait_for_a_dataset_that_may_download(make_spec, tmp_path):
    from octomil_sim.data import may_download

    assert may_download(make_spec("dataset=femnist"))  # a hub id: the driver's check downloads it first
    assert not may_download(make_spec("dataset=femnist", f"dataset.source.path={tmp_path}"))  # local parquet files
    assert not may_download(make_spec())  # generated, cached before Ray starts


def test_split_even_keeps_order_and_balances():
    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_even([1], 3) == [[1], [], []]


def test_split_by_work_balances_unequal_clients_longest_first():
    work = {"a": 10, "b": 1, "c": 1, "d": 8}
    # a -> group 0 (10); d -> group 1 (8); b, c -> group 1 (9, then 10, the lighter each time)
    assert split_by_work(["a", "b", "c", "d"], 2, work.get) == [["a"], ["b", "c", "d"]]
    assert split_by_work(["a", "b"], 3, work.get) == [["a"], ["b"], []]
    even = {k: 1 for k in "abcdef"}
    assert split_by_work(list("abcdef"), 2, even.get) == [["a", "c", "e"], ["b", "d", "f"]]


def _system(**classes):
    return SystemModel.build({"classes": classes, "deadline": 10.0}, seed=0, num_clients=10)


def test_system_classes_have_exact_shares_and_fixed_draws():
    model = (_system(low={"share": 0.3, "max_steps": 2, "speed": 0.5, "dropout": 0.5},
                                            high={"share": 0.7}))
    assert sorted(model.assignment).count("low") == 3
    assert model.assignment == (_system(
        low={"share": 0.3, "max_steps": 2, "speed": 0.5, "dropout": 0.5}, high={"share": 0.7})).assignment
    low = model.assignment.index("low")
    assert model.duration(low, 4) == 8.0  # 4 steps at speed 0.5
    drops = [model.drops_out(low, r) for r in range(400)]
    assert 0.4 < np.mean(drops) < 0.6  # dropout 0.5
    high = model.assignment.index("high")
    assert not any(model.drops_out(high, r) for r in range(100))


def test_system_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"system.classes=\{.a.: 0.5\}: allowed: classes whose shares sum to 1"):
        (_system(a={"share": 0.5}))
    with pytest.raises(ConfigError, match=r"system.classes.a.dropout=1.5: allowed: a number in \[0, 1\)"):
        (_system(a={"share": 1.0, "dropout": 1.5}))


def test_step_budget_cuts_local_sgd():
    x, y = torch.randn(40, 2), torch.zeros(40, dtype=torch.long)
    model = torch.nn.Linear(2, 2)
    budget = StepBudget(3)
    sgd_epochs(model, x, y, epochs=2, batch_size=4, lr=0.1, generator=torch.Generator().manual_seed(0), budget=budget)
    assert budget.used == 3 and not budget.take()  # 20 steps asked, 3 allowed


def test_checkpoint_restores_state_and_client_store(tmp_path):
    store = tmp_path / "client_state"
    (store / "key").mkdir(parents=True)
    (store / "key" / "1.pt").write_text("round 2")
    save_checkpoint(tmp_path, 2, {"round": 2, "mu": {"a": 0.5}}, store)
    # after the checkpoint, the store changes the way DiskStateStore writes: new file, then rename
    (store / "key" / "1.tmp").write_text("round 3")
    (store / "key" / "1.tmp").replace(store / "key" / "1.pt")
    (store / "key" / "2.pt").write_text("new in round 3")
    folder, state = load_checkpoint(tmp_path)
    restore_client_state(folder, store)
    assert state == {"round": 2, "mu": {"a": 0.5}}
    assert (store / "key" / "1.pt").read_text() == "round 2"
    assert not (store / "key" / "2.pt").exists()
    save_checkpoint(tmp_path, 4, {"round": 4}, store)
    save_checkpoint(tmp_path, 6, {"round": 6}, store)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["round_000004", "round_000006"]
    assert load_checkpoint(tmp_path)[1] == {"round": 6}


def test_a_checkpoint_with_raw_rows_is_the_same_file(tmp_path):
    """``RawJSON`` rows (each row's JSON made once, as the run makes them) write the bytes that
    encoding the rows at the checkpoint writes."""
    import json

    import numpy as np

    from octomil_sim.checkpoint import RawJSON, encode, read_checkpoint, save_checkpoint

    rows = [{"round": i, "acc": np.float32(0.25) * i, "n": 3, "note": None} for i in range(4)]
    state = {"round": 4, "arrays": {"w": torch.ones(2)}, "rows": rows, "grid": {"a": [1, 2]}}
    plain = save_checkpoint(tmp_path / "plain", 4, state, None)
    raw = RawJSON("[" + ", ".join(json.dumps(encode(r)[0]) for r in rows) + "]")
    fast = save_checkpoint(tmp_path / "raw", 4, {**state, "rows": raw}, None)
    assert (plain / "state.json").read_bytes() == (fast / "state.json").read_bytes()
    assert read_checkpoint(fast)["rows"] == [{"round": i, "acc": 0.25 * i, "n": 3, "note": None} for i in range(4)]
    empty = save_checkpoint(tmp_path / "empty", 1, {**state, "rows": RawJSON("[]")}, None)
    assert read_checkpoint(empty)["rows"] == []


def test_prompt_simulation_runtime_moves_messages_and_restores_flower():
    import queue
    import threading

    from flwr.server.superlink.fleet.vce import vce_api

    from octomil_sim.polling import prompt_simulation_runtime

    original = vce_api.add_messages_to_queue, vce_api.put_message_into_state, vce_api.Queue

    class FakeState:  # two nodes' inboxes, read one message at a time as the LinkState is
        def __init__(self):
            self.inbox = {1: ["a", "b"], 2: ["c"]}

        def get_message_ins(self, node_id, limit):
            box = self.inbox[node_id]
            return [box.pop(0)] if box else []

    with prompt_simulation_runtime(stop_check=0.01):
        q, stop = vce_api.Queue(), threading.Event()
        scanner = threading.Thread(target=vce_api.add_messages_to_queue, args=(FakeState(), q, {1: 0, 2: 1}, stop),
                                   daemon=True)
        scanner.start()
        try:
            # the plain Queue's read: this queue's own waits at most stop_check (10 ms), too short on a busy machine
            got = sorted(queue.Queue.get(q, timeout=5) for _ in range(3))
        finally:
            stop.set()
            scanner.join(timeout=5)
        assert not scanner.is_alive()
        with pytest.raises(queue.Empty):
            q.get(timeout=3600)  # returns after stop_check: the caller's loop then sees its stop event
    assert got == ["a", "b", "c"]
    assert (vce_api.add_messages_to_queue, vce_api.put_message_into_state, vce_api.Queue) == original


def test_the_runtimes_scan_queues_the_message_for_the_driver_after_the_actors_ones():
    """With the driver's own node, a scan queues the message marked for the driver (``batching.for_driver``)
    after the others, whatever its node: an actor's message is then sent before the driver's node starts
    training and holds the GIL (traced on 2 cores: it reached its worker 0.23 ms into an exchange against
    0.53 ms)."""
    import queue
    import threading
    import types

    from flwr.app import ConfigRecord, RecordDict
    from flwr.server.superlink.fleet.vce import vce_api

    from octomil_sim.batching import pack
    from octomil_sim.polling import prompt_simulation_runtime

    def message(name: str, driver: bool) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=name, content=pack([(0, RecordDict({"c": ConfigRecord({"x": 1})}))],
                                                                 driver=driver))

    class FakeState:
        def __init__(self):
            self.inbox = {1: [message("driver's", True)], 2: [message("actor's", False)], 3: [message("other", False)]}

        def get_message_ins(self, node_id, limit):
            box = self.inbox[node_id]
            return [box.pop(0)] if box else []

    with prompt_simulation_runtime(stop_check=0.01):
        q, stop = vce_api.Queue(), threading.Event()
        scanner = threading.Thread(target=vce_api.add_messages_to_queue, args=(FakeState(), q, {1: 0, 2: 1, 3: 2}, stop),
                                   daemon=True)
        scanner.start()
        try:
            got = [queue.Queue.get(q, timeout=5).name for _ in range(3)]
        finally:
            stop.set()
            scanner.join(timeout=5)
    assert got == ["actor's", "other", "driver's"]


def test_the_runtime_waits_on_pushes_and_announces_replies():
    """No polling period: a push wakes the scan at once (here stop_check is 5 s), and every reply
    stored sets ``REPLIED``, which ``SimulationGrid`` waits on."""
    import threading
    import time

    from flwr.server.superlink.fleet.vce import vce_api

    from octomil_sim.polling import PUSHED, REPLIED, prompt_simulation_runtime

    class FakeState:
        def __init__(self):
            self.inbox, self.stored = [], []

        def get_message_ins(self, node_id, limit):
            return [self.inbox.pop(0)] if self.inbox else []

        def store_message_res(self, message):
            self.stored.append(message)

    state = FakeState()
    with prompt_simulation_runtime(stop_check=5.0):
        ins, res, stop = vce_api.Queue(), vce_api.Queue(), threading.Event()
        threads = [threading.Thread(target=vce_api.add_messages_to_queue, args=(state, ins, {1: 0}, stop), daemon=True),
                   threading.Thread(target=vce_api.put_message_into_state, args=(state, res, stop), daemon=True)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)  # the scan found nothing and waits (up to stop_check, 5 s)
            started = time.monotonic()
            state.inbox.append("message")
            PUSHED.set()
            assert ins.get(timeout=5) == "message" and time.monotonic() - started < 2.5
            REPLIED.clear()
            res.put("reply")
            assert REPLIED.wait(5) and state.stored == ["reply"]
        finally:
            stop.set()
            PUSHED.set()  # wakes the scan, which sees the stop event
            res.put("late")  # wakes the reply thread, which stores it and sees the stop event
            for t in threads:
                t.join(timeout=15)
        assert not any(t.is_alive() for t in threads)


def test_ray_started_as_a_lean_head_node_has_no_monitor_or_api_server_and_works(capfd):
    import threading
    import time

    import ray
    from ray._private import ray_constants, worker
    from ray._private.node import Node

    from octomil_sim.local_ray import lean_head_node

    methods = Node.start_monitor, Node.start_api_server, Node.start_log_monitor
    with lean_head_node():  # how the runner starts Ray
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    assert (Node.start_monitor, Node.start_api_server, Node.start_log_monitor) == methods
    follower = next(t for t in threading.enumerate() if t.name == "ray-log-monitor")
    try:
        started = worker._global_node.all_processes
        assert ray_constants.PROCESS_TYPE_MONITOR not in started
        assert ray_constants.PROCESS_TYPE_DASHBOARD not in started
        assert ray_constants.PROCESS_TYPE_LOG_MONITOR not in started  # a thread of this process instead
        assert ray_constants.PROCESS_TYPE_RAYLET in started and ray_constants.PROCESS_TYPE_GCS_SERVER in started
        assert ray.get(ray.remote(lambda: 8).remote()) == 8
        # a task's print reaches this process's output through that thread, as through Ray's process
        ray.get(ray.remote(lambda: print("printed in a worker: 5b1e", flush=True)).remote())
        seen, deadline = "", time.monotonic() + 30
        while "printed in a worker: 5b1e" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen += "".join(capfd.readouterr())
        assert "printed in a worker: 5b1e" in seen
        # the client actor the runner has Flower's Ray backend build (``lean_client_actors``)
        from octomil_sim.ray_actor import ClientAppActor

        actor = ClientAppActor.options(num_cpus=1).remote()
        echo = ray.get(actor.run.remote(lambda: (lambda message, context: f"{message} seen in {context}"), "m", "7", "c"))
        assert echo == ("7", "m seen in c", "c")
        with pytest.raises(Exception, match="ClientAppException") as failed:
            ray.get(actor.run.remote(lambda: (lambda message, context: 1 / 0), "m", "7", "c"))
        assert "division by zero" in str(failed.value)
        # a loader pickled once (``PickledOnce``): the actor unpickles it on its first message and
        # keeps it, so the app's own state lives on from message to message
        from octomil_sim.ray_actor import PickledOnce

        def counting_app():
            calls = []
            return lambda: (lambda message, context: calls.append(message) or len(calls))

        once = PickledOnce(counting_app())
        assert [ray.get(actor.run.remote(once, "m", "7", "c"))[1] for _ in range(3)] == [1, 2, 3]
        fresh = PickledOnce(counting_app())  # another run's loader: unpickled anew
        assert ray.get(actor.run.remote(fresh, "m", "7", "c"))[1] == 1
        assert ray.get(actor.run.remote(counting_app(), "m", "7", "c"))[1] == 1  # Flower's way: fresh every message
        assert ray.get(actor.run.remote(counting_app(), "m", "7", "c"))[1] == 1
    finally:
        ray.shutdown()
    follower.join(timeout=10)
    assert not follower.is_alive()  # it ends with the Ray instance


def test_early_client_actors_prepare_the_app_and_fill_flowers_pool_first(tmp_path):
    """``early_client_actors`` starts the actors Flower's pool will want as soon as Ray is up and has
    each prepare the app (imports, data, model) while the driver still checks the data; the pool
    built under ``lean_client_actors(early)`` takes them instead of starting its own, and early
    actors it does not take end with the block."""
    import os
    import types

    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from octomil_sim.local_ray import early_client_actors, lean_client_actors, lean_head_node

    class App:  # pickled by value into the actors (a class local to the test)
        def __init__(self, folder):
            self.folder = folder

        def prepare(self):
            with open(os.path.join(self.folder, f"prepared-{os.getpid()}"), "w"):
                pass

        def __call__(self, message, context):
            return f"{message} in {os.getpid()}"

    with lean_head_node():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        backend = types.SimpleNamespace(client_resources={"num_cpus": 1}, actor_kwargs={})
        early = early_client_actors(backend, App(str(tmp_path)))
        assert len(early) == 2  # two CPUs, one each: Flower's pool size
        with lean_client_actors(early):
            pool = raybackend.BasicActorPool(actor_type=raybackend.ClientAppActor, client_resources={"num_cpus": 1},
                                             actor_kwargs={})
            pool.add_actors_to_pool(1)
            assert pool.pool == [early[0]] and pool.num_actors == 1
        reply = ray.get(early[0].run.remote(lambda: App(str(tmp_path)), "m", "7", "c"), timeout=60)
        pid = int(reply[1].split(" in ")[1])
        assert (tmp_path / f"prepared-{pid}").exists()  # prepared before its first message
        with pytest.raises(ray.exceptions.RayActorError):  # the one the pool did not take was ended
            ray.get(early[1].run.remote(lambda: App(str(tmp_path)), "m", "7", "c"), timeout=60)
    finally:
        ray.shutdown()


def test_a_simulations_ray_processes_import_neither_pyarrow_nor_the_dashboards_dependencies():
    """A fresh driver that starts its lean head node (as the runner does) and one client actor: Ray
    imports pyarrow and Starlette in neither (its serializers for them, ``skip_unused_serializers``,
    in the actor by the job's setup hook), and the driver does not import aiohttp to learn that the
    dashboard's dependencies are missing."""
    import subprocess
    import sys

    code = (
        "import sys, ray\n"
        "from octomil_sim.local_ray import lean_head_node\n"
        "from octomil_sim.ray_actor import ClientAppActor\n"
        "with lean_head_node():\n"
        "    ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR')\n"
        "try:\n"
        "    loaded = lambda: sorted(m for m in ('pyarrow', 'aiohttp', 'starlette') if m in sys.modules)\n"
        "    actor = ClientAppActor.remote()\n"
        "    _, inside, _ = ray.get(actor.run.remote(lambda: lambda message, context: loaded(), 'm', '0', 'c'), timeout=120)\n"
        "    assert ray.get(ray.put({'a': [1, 2]})) == {'a': [1, 2]}\n"
        "    print(inside, loaded())\n"
        "finally:\n"
        "    ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[] []", out.stdout + out.stderr


def test_the_driver_node_backend_runs_the_marked_message_here_and_the_others_in_its_one_actor_while_free():
    """``driver_node_backend``: Ray's 2 CPUs hold two actors, the pool starts one (``spare=1``), and the
    driver is the second worker. The message marked for the driver (``batching.for_driver``) runs in the
    driver's process even with the actor free; another goes to the actor while it is free, else to the
    driver's node too; errors come back as Flower's ``ClientAppException`` either way."""
    import os
    import signal
    import threading
    import time
    import types

    import ray
    from flwr.app import ConfigRecord, RecordDict
    from flwr.clientapp.client_app import ClientAppException

    from octomil_sim.batching import pack
    from octomil_sim.local_ray import driver_node_backend, lean_client_actors, lean_head_node
    from octomil_sim.ray_actor import ChannelCall

    class App:  # pickled by value into the actor
        def __call__(self, message, context):
            name = message if isinstance(message, str) else message.content["0/config"]["name"]
            if name.startswith("bad"):
                raise ValueError("boom")
            if name == "slow":
                import time
                time.sleep(1.0)
            return f"{name} in {os.getpid()}"

    def marked(name: str) -> types.SimpleNamespace:  # a message: what the backend reads of it is its content
        return types.SimpleNamespace(content=pack([(0, RecordDict({"config": ConfigRecord({"name": name})}))],
                                                  driver=True))

    with lean_head_node():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with lean_client_actors([], spare=1):
            backend = driver_node_backend({"client_resources": {"num_cpus": 1}})()
            backend.build(lambda: App())
        assert backend.pool.num_actors == 1 and backend.num_workers == 2 and backend.is_worker_idle()
        deadline = time.monotonic() + 60  # the actor's channel (``ClientAppActor.listen``) carries its messages
        while backend.pool.channel(backend.pool.pool[0]) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fetch, futures = backend.pool.fetch_result_and_return_actor_to_pool, []
        backend.pool.fetch_result_and_return_actor_to_pool = lambda future: fetch(futures.append(future) or future)
        context = types.SimpleNamespace(node_config={"partition-id": 0})
        here = f" in {os.getpid()}"
        assert backend.process_message(marked("a"), context) == ("a" + here, context)  # marked: here
        with pytest.raises(ClientAppException, match="boom"):
            backend.process_message(marked("bad"), context)
        reply, _ = backend.process_message("b", context)  # not marked, the actor free: the actor
        assert reply.startswith("b in ") and not reply.endswith(here)
        with pytest.raises(ClientAppException, match="boom"):
            backend.process_message("bad", context)
        replies = []
        busy = threading.Thread(target=lambda: replies.append(backend.process_message("slow", context)[0]))
        busy.start()  # holds the one actor for a second
        deadline = time.monotonic() + 60
        while backend.in_actors == 0:
            assert time.monotonic() < deadline
        assert backend.process_message("c", context)[0] == "c" + here  # no actor free: here
        busy.join(timeout=60)
        assert replies and not replies[0].endswith(here) and backend.in_actors == 0
        actor = backend.pool.pool[0]
        os.kill(int(reply.split()[-1]), signal.SIGKILL)  # the actor's process dies (a client's segfault);
        deadline = time.monotonic() + 60  # a direct call tells when Ray knows it
        while True:
            try:
                ray.get(actor.run.remote(lambda: App(), "ping", "0", context), timeout=60)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline
        with pytest.raises(ray.exceptions.RayActorError):  # its message fails, then the driver's node serves
            backend.process_message("d", context)
        assert backend.pool.num_actors == 0 and backend.pool.pool == []
        # b, bad and slow went through the channel (d failed as it was sent: the dead actor's socket is closed)
        assert len(futures) == 3 and all(isinstance(f, ChannelCall) for f in futures)
        assert backend.process_message("e", context)[0] == "e" + here
        backend.terminate()
    finally:
        ray.shutdown()


@contextmanager
def flower_ray_backend(num_cpus: int, app):
    """Flower's own Ray backend (no driver's node) built inside ``lean_client_actors`` on a private Ray
    instance of ``num_cpus`` CPUs, one actor a CPU, serving ``app``; yielded once every actor's
    channel (``ClientAppActor.listen``) is connected, and Ray shut down after."""
    import time

    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from octomil_sim.local_ray import lean_client_actors, lean_head_node

    with lean_head_node():
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        with lean_client_actors([]):
            backend = RayBackend({"client_resources": {"num_cpus": 1}})
            backend.build(lambda: app)
        assert backend.pool.num_actors == num_cpus
        deadline = time.monotonic() + 60
        while any(backend.pool.channel(actor) is None for actor in list(backend.pool.pool)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield backend
        backend.terminate()
    finally:
        ray.shutdown()


def test_worker_threads_sharing_the_pool_each_get_their_own_messages_reply():
    """Flower's worker threads call the pool at the same time (here three threads, two actors, each actor
    with its channel): every message gets its own reply back, none another's, and both actors serve.
    Two threads that took the same actor's channel would interleave their bytes on one socket."""
    import os
    import threading
    import time
    import types

    class App:  # pickled by value into the actors
        def __call__(self, message, context):
            return message, os.getpid()

    with flower_ray_backend(2, App()) as backend:
        pool = backend.pool
        context = types.SimpleNamespace(node_config={"partition-id": 0})
        got, errors = {}, []
        free = threading.Semaphore(2)  # as Flower's runtime: no more messages at once than actors
        deadline = time.monotonic() + 120

        def work(thread: int) -> None:
            try:
                for i in range(150):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"thread {thread} at message {i}")
                    sent = f"{thread}-{i}"
                    with free:
                        got[sent] = backend.process_message(sent, context)[0]
            except Exception as ex:  # noqa: BLE001
                errors.append(ex)

        threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not errors and len(got) == 450
        assert all(reply == sent for sent, (reply, _) in got.items())
        assert len({pid for _, pid in got.values()}) == 2 and len(pool.pool) == 2


def test_without_the_driver_node_an_actor_whose_channel_died_stays_in_flowers_pool():
    """``lean_client_actors`` without the driver's node (Flower's own Ray backend): a message goes
    through the actor's channel; when the actor's process dies, its message fails with Ray's
    ``RayActorError``, its channel is closed and the actor stays in the pool, as Flower's pool keeps
    it: the next message goes as Ray's task, and fails as Flower's would."""
    import os
    import signal
    import types

    import ray

    from octomil_sim.ray_actor import ChannelCall

    class App:  # pickled by value into the actor
        def __call__(self, message, context):
            return os.getpid()

    with flower_ray_backend(1, App()) as backend:
        pool, context = backend.pool, types.SimpleNamespace(node_config={"partition-id": 0})
        actor = pool.pool[0]
        fetch, futures = pool.fetch_result_and_return_actor_to_pool, []
        pool.fetch_result_and_return_actor_to_pool = lambda future: fetch(futures.append(future) or future)
        pid, _ = backend.process_message("a", context)
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            backend.process_message("b", context)
        assert pool.channels == {} and pool.pool == [actor] and pool.num_actors == 1
        with pytest.raises(ray.exceptions.RayActorError):
            backend.process_message("c", context)  # as Ray's task: Flower's pool keeps the dead actor
        assert pool.pool == [actor]
        # a through the channel; b too if it went before the socket closed (else it failed as it was sent); c as a task
        assert [type(f) for f in futures] in ([ChannelCall, ChannelCall, ray.ObjectRef], [ChannelCall, ray.ObjectRef])


def test_the_driver_node_serves_the_messages_while_its_early_actor_still_prepares(tmp_path):
    """Until the early actor has prepared the app (imports, data, model), a message the busy driver's
    node cannot take waits for it instead of queueing behind the actor's start; once the actor is
    ready, such a message goes to it again."""
    import os
    import threading
    import time
    import types

    import ray

    from octomil_sim.local_ray import driver_node_backend, early_client_actors, lean_client_actors, lean_head_node

    class App:  # pickled by value into the actor
        def __init__(self, folder):
            self.folder = folder

        def prepare(self):  # the actor's start takes until the test lets it go on
            while not os.path.exists(os.path.join(self.folder, "go")):
                time.sleep(0.02)

        def __call__(self, message, context):
            return f"{message} in {os.getpid()}"

    with lean_head_node():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        early = early_client_actors(types.SimpleNamespace(client_resources={"num_cpus": 1}, actor_kwargs={}),
                                    App(str(tmp_path)), spare=1)
        with lean_client_actors(early, spare=1):
            backend = driver_node_backend({"client_resources": {"num_cpus": 1}})()
            backend.build(lambda: App(str(tmp_path)))
        assert backend.pool.num_actors == 1 and not backend.actors_ready()
        context = types.SimpleNamespace(node_config={"partition-id": 0})
        replies = []
        with backend.local_busy:  # the driver's node serves a message; the next one waits for it
            waiting = threading.Thread(target=lambda: replies.append(backend.process_message("b", context)[0]))
            waiting.start()
            time.sleep(0.3)
            assert not replies
        waiting.join(timeout=30)
        assert replies == [f"b in {os.getpid()}"]  # served here, not queued behind the actor's start
        (tmp_path / "go").touch()
        deadline = time.monotonic() + 120
        while not backend.actors_ready():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        replies.clear()
        with backend.local_busy:  # (in a thread: a message that waited for the driver's node would hang here)
            sent = threading.Thread(target=lambda: replies.append(backend.process_message("c", context)[0]), daemon=True)
            sent.start()
            sent.join(timeout=60)
        assert replies and int(replies[0].split(" in ")[1]) != os.getpid()  # the ready actor serves again
        backend.terminate()
    finally:
        ray.shutdown()


def test_small_messages_travel_to_an_actor_pickled_and_large_ones_as_objects(task_identity):
    """``ray_actor.submit_pickled``: a message whose arrays hold fewer than ``PICKLED_BYTES`` goes to the
    actor's ``run_pickled`` as bytes and its small reply comes back as bytes; a larger one goes to
    ``run`` as objects and comes back as Ray serialised it. ``fetch_pickled`` reads both the same way."""
    import ray
    from flwr.app import Array, Message, RecordDict

    from octomil_sim.local_ray import lean_head_node
    from octomil_sim.ray_actor import ClientAppActor, fetch_pickled, submit_pickled

    class Echo:  # pickled by value into the actor: replies with the content it got
        def __call__(self, message, context):
            return Message(message.content, reply_to=message)

    def message(size: int) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(size, dtype=np.float32))})}),
                       dst_node_id=1, message_type="train", group_id="1")

    with lean_head_node():
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        actor = ClientAppActor.remote()
        for size, travels in ((100, bytes), (100_000, tuple)):
            sent = message(size)
            future = submit_pickled(lambda: Echo(), sent, "7", "the context")(actor)
            assert isinstance(ray.get(future, timeout=120), travels)
            cid, reply, context = fetch_pickled(future)
            assert (cid, context) == ("7", "the context")
            assert reply.content["arrays"]["w"].data == sent.content["arrays"]["w"].data
    finally:
        ray.shutdown()


def test_an_actor_on_this_machine_answers_small_messages_through_its_channel(task_identity):
    """``ClientAppActor.listen`` and ``ray_actor.connect``: a small message goes through the actor's
    channel (a ``ChannelCall``, not a Ray task) and comes back with the app's reply from the actor's
    process; a large one still goes as Ray's task; an app's error, or its ``SystemExit``, comes back as
    ``ClientAppException`` and the channel serves on; an actor on another node opens no channel; the
    channel serves only the driver's process (another process that connects first is closed unread);
    an actor whose process dies while it runs a message, or between messages, fails it with Ray's
    ``ActorDiedError``."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import ray
    from flwr.app import Array, Message, RecordDict
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

    from octomil_sim.local_ray import lean_head_node
    from octomil_sim.ray_actor import ChannelCall, ClientAppActor, connect, fetch_pickled, submit_pickled

    class Echo:  # pickled by value into the actor: replies with the content it got, and where it ran
        def __call__(self, message, context):
            import time

            first = message.content["arrays"]["w"].numpy()[0]
            if first == -1:
                raise ValueError("a negative weight")
            if first == -2:
                raise SystemExit(3)
            if first == -3:
                time.sleep(60)
            if first == -4:
                from flwr.clientapp.client_app import LoadClientAppError

                raise LoadClientAppError("no app here")
            if first == -5:  # an app that forks a process which outlives it
                child = os.fork()
                if child == 0:
                    time.sleep(30)
                    os._exit(0)
                return child, os.getpid()
            return Message(message.content, reply_to=message), os.getpid()

    def message(size: int, value: float = 1.0) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(size, value, dtype=np.float32))})}),
                       dst_node_id=1, message_type="train", group_id="1")

    def send(value: float, channel, size: int = 100):
        return submit_pickled(lambda: Echo(), message(size, value), "7", "the context")(actor, channel)

    with lean_head_node():
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        actor = ClientAppActor.remote()
        node = ray.get_runtime_context().get_node_id()
        assert ray.get(actor.listen.remote(lambda: Echo(), ("another node", os.getpid())), timeout=120) is None
        assert connect(None) is None
        address = ray.get(actor.listen.remote(lambda: Echo(), (node, os.getpid())), timeout=120)
        # another process connects first and holds its connection: the actor closes it unread
        other = subprocess.Popen([sys.executable, "-c", "import sys; from multiprocessing.connection import Client; "
                                  f"c = Client({address!r}, family='AF_UNIX'); print('in', flush=True); "
                                  "c.recv_bytes()"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert other.stdout.readline() == "in\n"
        _, err = other.communicate(timeout=60)
        assert "EOFError" in err  # closed unread by the actor
        channel = connect(address)
        assert channel is not None
        future = send(1.0, channel)
        assert isinstance(future, ChannelCall)
        cid, (reply, pid), context = fetch_pickled(future)
        assert (cid, context) == ("7", "the context") and pid != os.getpid()
        assert reply.content["arrays"]["w"].data == message(100).content["arrays"]["w"].data
        large = send(1.0, channel, size=100_000)
        assert isinstance(large, ray.ObjectRef) and fetch_pickled(large)[1][1] == pid
        with pytest.raises(ClientAppException, match="a negative weight"):
            fetch_pickled(send(-1.0, channel))
        with pytest.raises(ClientAppException, match="SystemExit: 3"):
            fetch_pickled(send(-2.0, channel))
        with pytest.raises(LoadClientAppError, match="no app here"):  # as ``run``: the loader's error as it is
            fetch_pickled(send(-4.0, channel))
        assert fetch_pickled(send(1.0, channel))[1][1] == pid  # it still serves
        # an actor whose app set a default socket timeout: its channel still blocks, idle or not
        patient = ClientAppActor.options(num_cpus=0).remote(
            on_actor_init_fn=lambda: __import__("socket").setdefaulttimeout(0.2))
        idle = connect(ray.get(patient.listen.remote(lambda: Echo(), (node, os.getpid())), timeout=120))
        time.sleep(0.6)
        reply = fetch_pickled(submit_pickled(lambda: Echo(), message(100), "5", "c")(patient, idle))
        assert reply[0] == "5" and reply[1][1] != pid
        # that actor's app forks a child that outlives the actor: the child does not hold the channel open
        child, patient_pid = fetch_pickled(submit_pickled(lambda: Echo(), message(100, -5.0), "6", "c")(patient, idle))[1]
        try:
            os.kill(patient_pid, signal.SIGKILL)
            failed = []

            def after_death():
                try:
                    fetch_pickled(submit_pickled(lambda: Echo(), message(100), "6", "c")(patient, idle))
                except ray.exceptions.ActorDiedError as ex:
                    failed.append(ex)

            waiter = threading.Thread(target=after_death, daemon=True)
            waiter.start()
            waiter.join(timeout=20)
            assert failed, "the driver still waits on a dead actor's channel"
        finally:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        slow = send(-3.0, channel)  # the actor dies while it runs this one
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(ray.exceptions.ActorDiedError):
            fetch_pickled(slow)
        with pytest.raises(ray.exceptions.ActorDiedError):  # and a message sent after it died
            fetch_pickled(send(1.0, channel))
    finally:
        ray.shutdown()


def test_pickled_once_pickles_its_loader_once_and_unpickles_it_once_per_process():
    import pickle

    from octomil_sim import ray_actor

    pickled = []

    class Loader:  # counts how often it is pickled
        def __reduce__(self):
            pickled.append(1)
            return str, ("the app",)

    once = ray_actor.PickledOnce(Loader())
    assert len(pickled) == 1
    messages = [pickle.dumps(once) for _ in range(3)]  # what travels with three messages
    assert len(pickled) == 1 and len(set(messages)) == 1
    ray_actor._LOADED.clear()
    first, second = (pickle.loads(m) for m in messages[:2])
    assert first == "the app" and second is first  # unpickled once, then found by its key
    other = ray_actor.PickledOnce(Loader())
    assert pickle.loads(pickle.dumps(other)) == "the app" and list(ray_actor._LOADED) == [other.key]


def test_lean_client_actors_swap_flowers_actor_for_one_that_skips_flwr_simulation():
    import subprocess
    import sys

    from flwr.server.superlink.fleet.vce.backend import raybackend

    from octomil_sim.local_ray import lean_client_actors
    from octomil_sim.ray_actor import ClientAppActor

    flower_actor, flower_build = raybackend.ClientAppActor, raybackend.RayBackend.build
    assert flower_actor is not ClientAppActor
    with lean_client_actors():
        assert raybackend.ClientAppActor is ClientAppActor
        assert raybackend.RayBackend.build is not flower_build  # it wraps the app loader in ``PickledOnce``
    assert (raybackend.ClientAppActor, raybackend.RayBackend.build) == (flower_actor, flower_build)
    # what a client actor imports to unpickle its class: not Flower's simulation side
    code = "import sys, octomil_sim.ray_actor; print(sorted(m for m in sys.modules if m.startswith('flwr.simulation')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    code = "import sys, flwr.simulation.ray_transport.ray_actor; print('flwr.simulation.app' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() == "True"


@pytest.mark.parametrize("busy_thread", [False, True])
def test_cli_exit_runs_exit_handlers_and_skips_teardown(busy_thread):
    """``exit_without_teardown`` ends the process after the exit handlers and flushed output, unless
    a non-daemon thread still runs (then the interpreter must wait for it, so it returns)."""
    import subprocess
    import sys

    code = ("import atexit, sys, threading\n"
            "from octomil_sim.__main__ import exit_without_teardown\n"
            "atexit.register(lambda: print('handler ran'))\n"
            "done = threading.Event()\n"
            f"if {busy_thread}: threading.Thread(target=done.wait).start()\n"
            "print('written', end=' ')\n"
            "exit_without_teardown()\n"
            "print('returned')\n"
            "done.set()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == (["written", "returned", "handler", "ran"] if busy_thread
                                   else ["written", "handler", "ran"])


def test_flwr_datasets_plots_load_only_when_used():
    import subprocess
    import sys

    code = ("import sys, octomil_sim.data\n"
            "assert 'datasets' not in sys.modules and 'flwr_datasets' not in sys.modules\n"  # imported on first use
            "octomil_sim.data.hf_datasets()\n"
            "from flwr_datasets.partitioner import DirichletPartitioner\n"
            "assert 'seaborn' not in sys.modules and 'scipy.stats' not in sys.modules\n"
            "from flwr_datasets.visualization import plot_label_distributions\n"
            "assert callable(plot_label_distributions) and 'seaborn' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_received_state_dict_decodes_a_shared_record_once():
    from octomil_sim.client_app import received_state_dict

    ones, zeros = ArrayRecord({"w": torch.ones(2)}), ArrayRecord({"w": torch.zeros(2)})
    first = received_state_dict(ones)
    assert received_state_dict(ones) is first  # the next client of the same message: no decoding
    assert torch.equal(received_state_dict(zeros)["w"], torch.zeros(2))
    assert torch.equal(received_state_dict(ones)["w"], torch.ones(2))  # a new record is decoded again
