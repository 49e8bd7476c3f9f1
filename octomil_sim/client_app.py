"""The one Flower ``ClientApp`` of the framework; the algorithm's client half does the work.

Each Flower message carries several simulated clients (``octomil_sim.batching``): for every client,
the global ``ArrayRecord`` under ``arrays`` and a ``ConfigRecord`` under ``config`` (with
``server-round`` and whatever the strategy adds). Each client's reply carries the arrays it uploads
(train) and a ``MetricRecord`` under ``metrics`` with ``num-examples`` and ``partition-id``. A client
that fails (its resource class drops out, or its code raises) is reported as failed; the others go on.

Evaluation reports, on the client's held-out split, ``global_acc`` (the received model as is)
and ``personalized_acc`` (the model the algorithm's ``personalize`` returns; never uploaded).
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from octomil_sim.arrays import state_dict, to_record
from octomil_sim.batching import pack, pack_pair, unpack, unpack_pair
from octomil_sim.cohort import cohort_sgd, vectorizes
from octomil_sim.client_data import ClientData, ClientsFile, open_clients_file
from octomil_sim.spec import RunSpec
from octomil_sim.state import ClientState, ClientStateStore, make_store
from octomil_sim.system import ClientDropout, SystemModel
from octomil_sim.training import BatchStream, LocalTraining, StepBudget, client_seed, evaluate

if TYPE_CHECKING:
    from octomil_sim.data import FederatedData

Tensors = dict[str, torch.Tensor]


class PrivacyClient:
    """The client half of a ``privacy`` method (``strategies.dp``). ``trains`` True: its ``sgd_epochs``
    replaces ``octomil_sim.training.sgd_epochs`` in the local training of what the client uploads
    (DP-SGD); ``upload`` changes what is uploaded (client-side clipping) and adds metrics; ``report``:
    per-client numbers for ``results.json`` (the epsilon it spent). ``max_trainings``: the most times
    a client can train in the run (``simulation.rounds``)."""

    trains = False

    def __init__(self, max_trainings: int = 1):
        self.max_trainings = max_trainings

    def sgd_epochs(self, model, x, y, **kwargs) -> float:
        raise NotImplementedError

    def upload(self, upload: dict, received: dict, task: "ClientTask") -> tuple[dict, dict]:
        return upload, {}

    def report(self, state) -> dict[str, float]:
        return {}

    def summary(self, clients: list[dict]) -> dict | None:
        """``results.json``'s ``privacy`` from the final client rows (None: nothing to say)."""
        return None


@dataclass
class ClientTask:
    """What a client half gets with one message besides the model."""

    client_id: int
    server_round: int
    data: ClientData
    hp: LocalTraining
    generator: torch.Generator
    state: ClientState
    config: ConfigRecord
    budget: StepBudget = field(default_factory=StepBudget)  # local steps this message allows
    received: dict = field(default_factory=dict)  # what ``ClientAlgorithm.load`` derived (e.g. masks)
    initial: Callable[[], nn.Module] | None = None  # a fresh copy of the run's round-0 global model
    before: dict = field(default_factory=dict)  # what the fairness policy measured before training (loss_before)
    private: PrivacyClient | None = None  # the privacy group's client half (DP-SGD for what is uploaded), if any

    def batch_stream(self) -> BatchStream:
        """This client's minibatch stream, carried over from its previous round (``BatchStream``)."""
        return BatchStream(self.data.num_train, self.hp.batch_size, self.state)

    def initial_model(self) -> nn.Module:
        """The run's initial global model (the same weights every client and the server start
        from), e.g. the shared starting point of a model a client trains alone (Scafflix's x_i*,
        MaxFL's rho_i). Without a runtime (unit tests) there is none."""
        if self.initial is None:
            raise RuntimeError("this task has no initial model (built outside a ClientRuntime)")
        return self.initial()


class ClientAlgorithm:
    """Client half of an algorithm (the server half is a Flower ``Strategy``).

    ``train`` starts from the received global weights in ``model`` and returns what the client
    uploads and its scalar metrics; ``personalize`` returns the model this client would deploy
    (default: the global one).
    """

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        raise NotImplementedError

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        return model

    def load(self, model: nn.Module, arrays: ArrayRecord, task: ClientTask) -> nn.Module:
        """Put the received arrays into ``model`` (override for compressed or partial formats)."""
        model.load_state_dict(received_state_dict(arrays))
        return model

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        """Extra per-client evaluation numbers for ``results.json`` (``model``: the global one)."""
        return {}

    def train_cohort(self, models: list[nn.Module], tasks: list[ClientTask]) -> list[tuple[Tensors, dict]] | None:
        """``train`` for several clients of one message at once (``octomil_sim.cohort``), returning what
        ``train`` would return for each, up to float rounding; None when this algorithm or model cannot
        (then each client's ``train`` runs). Must return None before it changes anything (a task's
        generator, budget or state) and must not write client state unless it succeeds. The runtime
        only offers it models ``octomil_sim.cohort.vectorizes`` accepts (others train client by client)."""
        return None

    def sync(self, model: nn.Module, task: ClientTask) -> None:
        """Receive the new global model right after the round this client trained in (sent only by
        strategies that need it, as a ``train.sync`` message)."""

    #: True when ``objective_model`` is the client's personalized model (then a group-loss bound is
    #: checked on the personalized models' losses in ``results.json``)
    objective_is_personalized = False

    def objective_model(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """The model whose training loss is this client's objective at the received ``model``, which a
        fairness policy weights clients by (``loss_before``): the received model itself, or e.g.
        Scafflix's FLIX point alpha_i x_i* + (1 - alpha_i) x. Must leave ``model`` as it is."""
        return model

    #: False when its update writes every parameter, so a model with a frozen base (prompt tuning) cannot train
    frozen_parameters_ok = True

    #: True when ``train`` changes nothing of the model it gets but its parameter values, gradients and
    #: train/eval mode, ``objective_model`` and ``report`` only read it (the train/eval mode aside),
    #: and none keeps a reference to it (nor to its
    #: tensors: what ``train`` returns is encoded before the next client's arrays are loaded), and
    #: ``load`` is the full ``load_state_dict``: the runtime then loads each client's received
    #: arrays into one model instead of copying the template for every client. Only a class that says
    #: so itself counts (a subclass with its own ``train`` does not inherit it)
    reuses_model = False

    def check(self, model: nn.Module) -> None:
        """Raise ``ConfigError`` if this algorithm cannot work with ``model`` (run before Ray starts)."""


_last_received: list = [None, None]  # [ArrayRecord, its state dict]: the one a message's clients share


def forget_received() -> None:
    """Drop the decoded record ``received_state_dict`` keeps (the end of a run in this process)."""
    _last_received[:] = None, None


def received_state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """``arrays.to_torch_state_dict()`` (``octomil_sim.arrays.state_dict``), decoded once for all the
    clients of a message that share the record (the model is sent once per message). The tensors are shared: read them or copy
    them (``load_state_dict`` copies), never change them in place."""
    if _last_received[0] is not arrays:
        _last_received[:] = arrays, state_dict(arrays)
    return _last_received[1]


def build_model(spec: RunSpec) -> nn.Module:
    """The run's model for its dataset's input shape and classes."""
    d = spec.dataset
    return spec.model.net.build(input_shape=tuple(d.input_shape), num_classes=d.num_classes)


def build_initial_model(spec: RunSpec, seed: int | None = None) -> nn.Module:
    """The round-0 global model of a run: ``build_model`` under ``torch.manual_seed(simulation.seed)``
    (or ``seed``, e.g. a group model's own start; the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.simulation.seed if seed is None else seed)
        return build_model(spec)


@dataclass
class ClientRuntime:
    """What one process (a Ray actor) keeps between messages: data, model shape, algorithm."""

    spec: RunSpec
    data: FederatedData | ClientsFile  # (FederatedData: octomil_sim.data, imported where it is used)
    algorithm: ClientAlgorithm
    hp: LocalTraining
    store: ClientStateStore
    system: SystemModel
    template: nn.Module  # built once: Hydra's instantiate costs as much as a small client's update
    fairness: object | None = None  # the fairness policy's client half (``FairnessReport``), if any
    private: PrivacyClient | None = None  # the privacy group's client half, if any
    vectorize: bool = False  # train a message's clients together where the algorithm can (``train_message``)
    device: torch.device = torch.device("cpu")  # where models, data and loaded client state live (``client_device``)
    _cohort_works: bool | None = None  # set by the first vectorized message (``_probe_cohort``)
    _cohort_cap: int | None = None  # at most this many clients a cohort once one ran out of memory (``train_clients``)
    _initial: nn.Module | None = None
    _reused: list = field(default_factory=list)  # the models ``model_from(..., reuse=True, slot=k)`` loads into
    _reused_holds: ArrayRecord | None = None  # the record ``_reused[0]`` holds unchanged (evaluated only)
    _on_device: OrderedDict = field(default_factory=OrderedDict)  # {client: ClientData on ``device``}, least recent first
    _on_device_bytes: int = 0

    def begin_message(self) -> ClientRuntime:
        """Forget what is known of received records: a record is known by identity within one message
        only (with the local backend the server's own objects arrive, and a strategy may reuse one)."""
        forget_received()
        self._reused_holds = None
        return self

    def initial_model(self) -> nn.Module:
        if self._initial is None:
            self._initial = build_initial_model(self.spec).to(self.device)
        return copy.deepcopy(self._initial)

    def client_data(self, pid: int) -> ClientData:
        """The client's tensors on this runtime's device, kept there after their first use (a round's
        transfer costs more than a small client's update), the least recently used dropped once the
        kept ones exceed ``DEVICE_DATA_BYTES`` (several actors may share one GPU)."""
        data = self.data.client(pid)
        if self.device.type == "cpu":
            return data
        if pid in self._on_device:
            self._on_device.move_to_end(pid)
            return self._on_device[pid]
        moved = self._on_device[pid] = data.to(self.device)
        self._on_device_bytes += moved.nbytes
        while self._on_device_bytes > DEVICE_DATA_BYTES and len(self._on_device) > 1:
            self._on_device_bytes -= self._on_device.popitem(last=False)[1].nbytes
        return moved

    def model_from(self, arrays: ArrayRecord, task: ClientTask, reuse: bool = False,
                   read_only: bool = False, slot: int = 0) -> nn.Module:
        """The received model: ``arrays`` loaded into a copy of the template, or, with ``reuse``
        where the algorithm allows it (``ClientAlgorithm.reuses_model``), into one of the models this
        runtime reuses client after client (a deep copy costs more than a small client's update):
        ``slot`` k is the k-th client of a cohort (``train_clients``: a cohort's models live together;
        each is reused once its client's reply is encoded; ``train_clients`` keeps them within
        ``REUSED_BYTES``), 0 the client trained or evaluated alone.
        ``read_only``: the caller only evaluates it, so the next such caller with the same record
        (the clients of one evaluation message share it) gets it without loading it again."""
        if reuse and type(self.algorithm).__dict__.get("reuses_model", False) \
                and type(self.algorithm).load is ClientAlgorithm.load \
                and self.private is None:  # DP-SGD's training hooks the model
            while len(self._reused) <= slot:
                self._reused.append(copy.deepcopy(self.template))
            model = self._reused[slot]
            if slot:
                return self.algorithm.load(model, arrays, task)
            if not (read_only and self._reused_holds is arrays):
                self._reused_holds = None  # (a load that fails part way leaves it holding neither)
                self.algorithm.load(model, arrays, task)
            self._reused_holds = arrays if read_only else None  # training changes it
            return model
        return self.algorithm.load(copy.deepcopy(self.template), arrays, task)

    def task(self, content: RecordDict, pid: int, salt: int, max_steps: int | None = None) -> ClientTask:
        config = content.get("config")
        config = config if isinstance(config, ConfigRecord) else ConfigRecord()
        server_round = int(config.get("server-round", 0))
        generator = torch.Generator().manual_seed(client_seed(self.hp.seed + salt, server_round, pid))
        return ClientTask(pid, server_round, self.client_data(pid), self.hp, generator,
                          self.store.bind(pid, self.device), config, StepBudget(max_steps), initial=self.initial_model)

    # --- one client's share of a message --------------------------------------------------------
    def prepare_train(self, pid: int, content: RecordDict, reuse: bool = False,
                      slot: int = 0) -> tuple[ClientTask, nn.Module]:
        """The client's task and received model (``model_from``), and the fairness policy's numbers
        measured on it (``task.before``); raises ``ClientDropout`` when the system model drops it
        this round."""
        resources = self.system.of(pid)
        task = self.task(content, pid, salt=0, max_steps=resources.max_steps)
        task.private = self.private
        if self.system.drops_out(pid, task.server_round):
            raise ClientDropout(f"client {pid} ({resources.name}) dropped out in round {task.server_round}")
        model = self.model_from(content["arrays"], task, reuse, slot=slot)
        if self.fairness is not None:
            training = model.training  # the policy's evaluation puts the model in eval mode
            task.before = self.fairness.metrics(self.algorithm.objective_model(model, task), task)
            model.train(training)
        return task, model

    def train_reply(self, pid: int, task: ClientTask, upload: Tensors, metrics: dict,
                    received: ArrayRecord | None = None) -> RecordDict:
        metrics = {**metrics, **task.before}  # the policy's numbers, of the model the objective is about
        if self.private is not None:  # e.g. client-side clipping of client-level DP
            upload, extra = self.private.upload(upload, received_state_dict(received), task)
            metrics.update(extra)
        metrics.update({"num-examples": task.data.num_train, "partition-id": pid,
                        "local-steps": task.budget.used, "sim-time": self.system.duration(pid, task.budget.used)})
        return RecordDict({"arrays": to_record(upload), "metrics": MetricRecord(metrics)})

    def train(self, pid: int, content: RecordDict) -> RecordDict:
        task, model = self.prepare_train(pid, content, reuse=True)  # one client at a time: its reply is encoded before the next loads
        return self.train_reply(pid, task, *self.algorithm.train(model, task), content["arrays"])

    def train_message(self, packed: RecordDict) -> RecordDict:
        """``train_clients`` of a packed train message, packed."""
        return pack(*self.train_clients(unpack(packed)[0]))

    def train_clients(self, contents: dict[int, RecordDict]) -> tuple[list, list]:
        """All clients of a train message, as ``(done, failed)`` lists: with ``vectorize``, in cohorts that
        train together (``ClientAlgorithm.train_cohort``), each cohort as many clients as ``cohort_bytes``
        of stacked parameters allow (at most ``COHORT_CLIENTS``); client by client otherwise, or when the
        algorithm or model cannot. A client the system model drops is reported failed either way. Before
        the first cohort, one step of the kernel on two dummy clients checks that the model trains under
        ``vmap`` (a forward with ``.item()`` or data-dependent branches does not); if not, the run goes
        client by client, with nothing trained or stored yet. Should a cohort still fail, its clients run
        again one by one from fresh tasks (their generators are functions of the seed; state an algorithm
        wrote before the failure, e.g. MaxFL's local model, stays) and the run goes client by client from
        then on; a cohort of more than two that ran out of memory (``torch.OutOfMemoryError``: a GPU's
        activations, which ``cohort_bytes`` does not count) only halves the later cohorts instead."""
        if self.vectorize and self._cohort_works is None:
            self._cohort_works = self._probe_cohort()
        if not self.vectorize or not self._cohort_works or (self.private is not None and self.private.trains) \
                or not vectorizes(self.template):  # (every train_cohort declines such a model: one model at a time)
            return each_client(self.train, contents)
        items = sorted(contents.items())
        model_bytes = sum(p.numel() * p.element_size() for p in self.template.parameters())
        sim = self.spec.simulation
        # the local backend's one process has the whole GPU; a Ray actor its share
        budget = cohort_bytes(self.device, 1.0 if sim.backend == "local" else sim.num_gpus_per_client)
        fits = max(2, budget // max(1, 3 * model_bytes))  # weights, gradients, starting points
        kept = max(1, REUSED_BYTES // max(1, model_bytes))  # the first ``kept`` of a cohort load into kept models
        done, failed = [], []
        start = 0
        while start < len(items):
            size = min(COHORT_CLIENTS, self._cohort_cap or COHORT_CLIENTS, fits)  # (the cap may fall in the loop)
            chunk, start = items[start:start + size], start + size
            prepared = []
            for slot, (pid, content) in enumerate(chunk):
                guarded(pid, lambda: prepared.append((pid, *self.prepare_train(pid, content, slot < kept, slot))),
                        [], failed)
            pids, tasks, models = zip(*prepared) if prepared else ((), (), ())
            try:
                results = self.algorithm.train_cohort(list(models), list(tasks)) if len(prepared) > 1 else None
            except Exception as err:  # noqa: BLE001 - the cohort path must never lose a client
                if isinstance(err, torch.OutOfMemoryError) and len(prepared) > 2:
                    self._cohort_cap = len(prepared) // 2
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    logging.getLogger(__name__).warning(
                        "simulation.vectorize: a cohort of %d clients ran out of memory (%s); cohorts of at most %d "
                        "from now on", len(prepared), str(err).splitlines()[0][:200], self._cohort_cap)
                else:
                    traceback.print_exc()
                    self._cohort_works = False  # one traceback, not one a message
                for pid in pids:
                    guarded(pid, lambda: self.train(pid, contents[pid]), done, failed)
                continue
            if results is None:
                for pid, task, model in prepared:
                    guarded(pid, lambda: self.train_reply(pid, task, *self.algorithm.train(model, task),
                                                          contents[pid]["arrays"]), done, failed)
            else:
                for pid, task, result in zip(pids, tasks, results, strict=True):
                    guarded(pid, lambda: self.train_reply(pid, task, *result, contents[pid]["arrays"]), done, failed)
        return done, failed

    def _probe_cohort(self) -> bool:
        """Whether ``cohort_sgd`` runs on this run's model: one step of two dummy clients (nothing of
        the run's is touched). Models ``cohort.vectorizes`` rejects train client by client anyway."""
        if not vectorizes(self.template):
            return True  # the algorithms' train_cohort declines; nothing to probe
        d = self.spec.dataset
        x = torch.zeros(2, *d.input_shape, dtype=torch.long if d.tokens else torch.float32, device=self.device)
        y = torch.zeros(2, dtype=torch.long, device=self.device)
        state = {k: v.detach().clone() for k, v in self.template.state_dict().items()}
        try:
            cohort_sgd(self.template, [state, state], [x, x], [y, y], epochs=1, batch_size=2, lr=0.0,
                       generators=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
            return True
        except Exception as err:  # noqa: BLE001
            logging.getLogger(__name__).warning("simulation.vectorize: %s does not train under torch.func.vmap "
                                                "(%s: %s); its clients train one by one",
                                                type(self.template).__name__, type(err).__name__, err)
            return False

    def sync(self, pid: int, content: RecordDict) -> RecordDict:
        task = self.task(content, pid, salt=2)
        self.algorithm.sync(self.model_from(content["arrays"], task), task)
        return RecordDict({"metrics": MetricRecord({"partition-id": pid})})

    def evaluate(self, pid: int, content: RecordDict) -> RecordDict:
        """The received (global) model's and the personalized model's loss and accuracy on the
        client's test split. An algorithm that deploys the global model as is (``personalize`` not
        overridden) gets the global numbers for both, evaluated once."""
        task = self.task(content, pid, salt=1)
        # read only: evaluate, the algorithm's report and objective model leave the values as they are
        # (``reuses_model``); a fairness policy's report is not the algorithm's to promise
        model = self.model_from(content["arrays"], task, reuse=True, read_only=self.fairness is None)
        data = task.data
        g_loss, g_acc = evaluate(model, data.x_test, data.y_test)
        if type(self.algorithm).personalize is ClientAlgorithm.personalize:
            p_loss, p_acc = g_loss, g_acc
        else:
            personal = self.algorithm.personalize(self.model_from(content["arrays"], task), task)
            p_loss, p_acc = evaluate(personal, data.x_test, data.y_test)
        metrics = {
            "global_loss": g_loss, "global_acc": g_acc,
            "personalized_loss": p_loss, "personalized_acc": p_acc,
            "num-examples": data.num_test, "partition-id": pid,
            **self.algorithm.report(model, task),
            **(self.fairness.report(self.algorithm.objective_model(model, task), task) if self.fairness else {}),
            **(self.private.report(task.state) if self.private is not None else {}),
        }
        return RecordDict({"metrics": MetricRecord(metrics)})


#: client data a GPU client runtime keeps on its device (``ClientRuntime.client_data``)
DEVICE_DATA_BYTES = 2 * 2**30


#: torch threads of the process (a Ray actor) or the thread (the local backend) running a ClientApp
CLIENT_THREADS = 1


@lru_cache(maxsize=2)
def client_runtime(spec: RunSpec, data_file: str | None = None) -> ClientRuntime:
    """The runtime of ``spec``'s clients in this process, built on its first message and kept. Its
    clients' tensors come from the clients file at ``data_file`` (``octomil_sim.client_data``: a
    generated dataset, Ray actors on this machine or the local backend) or, without one, from the
    partitions (``data.federated_data``)."""
    torch.set_num_threads(CLIENT_THREADS)  # one core per simulated client; Ray runs several side by side
    # in the actor's process: Flower's "Manually terminating ClientAppActor" at a normal shutdown is noise
    logging.getLogger("flwr").setLevel(logging.ERROR)
    s = spec.simulation
    device = client_device(s)
    return ClientRuntime(
        spec=spec,
        data=client_tensors(spec, data_file),
        algorithm=spec.strategy.client.build(),
        hp=LocalTraining(epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                         local_steps=s.local_steps),
        store=make_store(s.state_store, s.state_dir),
        system=SystemModel.of_run(spec),
        template=build_model(spec).to(device),
        fairness=spec.fairness.client.build() if spec.fairness.client else None,
        private=(spec.privacy.client.build(max_trainings=s.rounds)
                 if spec.privacy.client else None),
        vectorize=s.vectorize,
        device=device,
    )


def client_tensors(spec: RunSpec, data_file: str | None):
    """``spec``'s clients' tensors: from ``data_file`` once the driver has written it, else (none
    given, or none written in time) from the partitions."""
    data = open_clients_file(spec, data_file) if data_file else None
    if data is None:
        if data_file:
            from octomil_sim.client_data import CLIENTS_FILE_WAIT_S

            logging.getLogger(__name__).warning("no clients file %s after %.0f s: reading the partitions",
                                                data_file, CLIENTS_FILE_WAIT_S)
        from octomil_sim.data import federated_data

        data = federated_data(spec)
    return data


def client_device(s) -> torch.device:
    """Where this process's clients train: ``cuda`` when the run gives each client a share of a GPU
    (``simulation.num_gpus_per_client`` > 0; in a Ray actor, the GPU Ray assigned it, which it sees as
    device 0), else ``cpu``. Models, client data and loaded client state live there; what travels
    (uploads, received models) and what the client-state store keeps stay on the CPU.

    On the GPU, matrix products and convolutions run in full float32, as on the CPU: PyTorch's default
    lets cuDNN convolutions use TF32 (10-bit mantissa). Under that default the LEAF CNN's cohort and loop
    on an H200 ended one local epoch up to 8e-3 apart, where the MLR and MLP (no convolutions) agree to
    1e-7 (``experiments/bench_vectorize.py --device cuda``); a simulator's numbers should not depend on the
    card's fast modes. cuDNN is made to pick deterministic convolution algorithms, so fixed seeds repeat
    (its default may pick non-deterministic backward kernels). These are set for the process (the local
    backend restores the caller's settings after the run)."""
    if not s.num_gpus_per_client:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"simulation.num_gpus_per_client={s.num_gpus_per_client}: this client process sees no "
                           "CUDA device (torch.cuda.is_available() is False); allowed here: 0 (clients on the CPU)")
    float_modes(FULL_FLOAT32)
    return torch.device("cuda", torch.cuda.current_device())


#: ``float_modes`` of a GPU client process: TF32 off for matrix products and cuDNN convolutions, cuDNN's
#: deterministic algorithms (a seed fixes a convolution's numbers), no benchmarking among algorithms
FULL_FLOAT32 = (False, False, True, False)


def float_modes(new: tuple | None = None) -> tuple:
    """torch's (``matmul.allow_tf32``, ``cudnn.allow_tf32``, ``cudnn.deterministic``, ``cudnn.benchmark``)
    before the call; with ``new``, set to it (``client_device`` sets ``FULL_FLOAT32``, the local backend
    gives the caller's back after a run)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if new is not None:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = new
    return old


#: parameters of the models a runtime keeps to load a cohort's clients into (``ClientRuntime.model_from``)
REUSED_BYTES = 32 * 2**20
#: stacked parameters (weights, gradients, starting points) one training cohort may hold, and at most
#: this many clients (the kernel also copies the cohort's training rows into one tensor)
COHORT_BYTES = 256 * 2**20
COHORT_CLIENTS = 256
#: on a GPU, a cohort's stacked parameters may take this fraction of the process's share of the card's
#: memory (``cohort_bytes``; the rest: the clients' data, activations, the reused models)
GPU_COHORT_FRACTION = 0.25


def cohort_bytes(device: torch.device, gpu_share: float) -> int:
    """Bytes of stacked parameters (weights, gradients, starting points) one training cohort may hold:
    ``COHORT_BYTES`` on the CPU; on a GPU, ``GPU_COHORT_FRACTION`` of ``gpu_share`` of the card's memory
    (``train_clients`` passes a Ray actor's ``simulation.num_gpus_per_client`` and 1 for the local
    backend's single process), and never less than ``COHORT_BYTES`` (so more than a quarter of a share
    below about 1 GiB of card). The LEAF CNN (6.6M parameters, 79 MB a client stacked) would train in
    cohorts of 3 under ``COHORT_BYTES``, and of ``COHORT_CLIENTS`` (256) with a whole 80 GB card; the
    kernel benchmark's cohort of 100 CNN clients ran 11.3x faster than the GPU loop. Activations are
    not counted: a cohort that runs out of memory halves the later ones (``train_clients``). Any cohort
    size trains each client as it would alone, up to float rounding."""
    if device.type == "cpu":
        return COHORT_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    return max(COHORT_BYTES, int(GPU_COHORT_FRACTION * gpu_share * total))


def guarded(pid: int, work: Callable, done: list, failed: list) -> None:
    """``done.append((pid, work()))``, or, when the client fails (a dropout by the system model, or
    any error), ``failed.append((pid, reason))``: a failing client must not take its message down."""
    try:
        done.append((pid, work()))
    except ClientDropout as err:
        failed.append((pid, str(err)))
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        failed.append((pid, f"{type(err).__name__}: {err}"))


def run_clients(handler, packed: RecordDict) -> RecordDict:
    """``each_client`` of a packed message, packed."""
    return pack(*each_client(handler, unpack(packed)[0]))


def each_client(handler, contents: dict[int, RecordDict]) -> tuple[list, list]:
    """``handler(client, content)`` for every client, in client order, as ``(done, failed)`` lists;
    failures are reported per client (``guarded``) and the other clients go on."""
    done, failed = [], []
    for pid, content in sorted(contents.items()):
        guarded(pid, lambda: handler(pid, content), done, failed)
    return done, failed


def evaluate_then_train(runtime: ClientRuntime, packed: RecordDict) -> RecordDict:
    """A ``pack_pair`` of an evaluation and the next round's training (``SimulationGrid.evaluate_then_train``):
    every evaluated client first, then the training, as two messages would run them; one ``pack_pair`` reply.
    A training that fails as a whole (the train message would have failed) fails its clients, and the
    evaluation's replies still go back."""
    (evaluate_contents, _), (train_contents, _) = unpack_pair(packed)
    evaluated, evaluate_failed = each_client(runtime.evaluate, evaluate_contents)
    trained, train_failed = [], []
    if train_contents:
        try:
            trained, train_failed = runtime.train_clients(train_contents)
        except Exception as err:  # noqa: BLE001 - as a failed train message would: every client failed, the evaluation kept
            traceback.print_exc()
            train_failed = [(pid, f"{type(err).__name__}: {err}") for pid in sorted(train_contents)]
    return pack_pair(evaluated, trained, evaluate_failed, train_failed)


def build_client_app(spec: RunSpec, data_file: str | None = None) -> ClientApp:
    """A ClientApp for the run ``spec`` (which travels to the Ray actors with the app), its clients'
    tensors read from the clients file ``data_file`` when given (``client_runtime``)."""
    app = ClientApp()

    def runtime() -> ClientRuntime:
        return client_runtime(spec, data_file).begin_message()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(runtime().train_message(msg.content), reply_to=msg)

    @app.train("sync")
    def sync(msg: Message, context: Context) -> Message:
        return Message(run_clients(runtime().sync, msg.content), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return Message(run_clients(runtime().evaluate, msg.content), reply_to=msg)

    @app.train("evaluate_first")
    def evaluate_first(msg: Message, context: Context) -> Message:
        return Message(evaluate_then_train(runtime(), msg.content), reply_to=msg)

    app.prepare = lambda: client_runtime(spec, data_file)  # an early Ray actor builds it before the first message

    return app
