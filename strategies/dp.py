"""Differential privacy for the shared part of any personalization.

Client level (``ClientLevelDP``, ``privacy=client_level``): DP-FedAvg (McMahan et al., arXiv 1710.06963,
Algorithm 1 with the fixed-denominator estimator and flat clipping): each sampled client's update
``Delta_k = w_k - w`` of the arrays it uploads is clipped to L2 norm ``C``, the clipped updates are
averaged with equal weights over the ``m`` sampled clients, and Gaussian noise of standard deviation
``z C / m`` is added to the average. Adaptive clipping (Andrew et al., arXiv 1905.03871, Algorithm 1):
``C`` follows the target quantile of the update norms, estimated from a noised count. The wrappers are
Flower's own (``flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}SideFixedClipping``,
``DifferentialPrivacyServerSideAdaptiveClipping``: their configuration, reply checks, noise and count
noise); this module adds what the framework needs around them and differs where noted:
- clipping is ``clip_upload`` (flat clipping of the update, Algorithm 1's ClipFn): Flower's helper
  divides by the update's norm and fails on a client that did not move;
- adaptive clipping (server or client side) follows the paper where Flower's wrappers do not
  (``ServerSideAdaptive``);
- the personal parts stay out of it: only the arrays the clients upload are clipped and noised
  (personal layers' heads, a frozen base, fine-tuned or Ditto personal models never leave the client);
- equal weights: the wrapper sets every reply's ``num-examples`` to 1 before the inner strategy averages
  (the sensitivity ``C / m`` holds for the uniform average only; the paper's weighted estimator with
  capped weights is not implemented), and only strategies of the FedAvg family that average (no
  fairness policy, no coefficient step, one shape of upload) are accepted;
- the fixed denominator: when fewer than ``m`` clients reply (a dropout, a straggler past the
  deadline), the average is rescaled to ``sum_k Delta_k / m`` (``_fixed_denominator``), so one client
  still moves it by at most ``C / m``; a server step longer than the average (pFedMe's beta > 1) gets
  ``beta`` times the noise;
- reproducible noise: Flower draws from NumPy's global generator; each round's draws here come from it
  seeded with (seed, round) and the generator's state is restored afterwards;
- accounting with Opacus's RDP accountant (``opacus.accountants.RDPAccountant``) for the subsampled
  Gaussian mechanism at sample rate ``q = clients_per_round / num_clients`` over the rounds run;
  ``epsilon`` (with ``delta``) sets the noise multiplier through ``opacus.accountants.utils.
  get_noise_multiplier`` for ``simulation.rounds`` releases; the releases made are kept as a history
  of (z, q, count) in the checkpoint, so a run resumed with more rounds (a new z) reports what both
  parts spent. Difference: the accountant assumes Poisson
  sampling of clients, the simulation samples exactly ``m`` (the usual approximation, as in the paper's
  own experiments). Adaptive clipping is accounted at the ``noise_multiplier`` asked for: Flower splits
  it between the update (``z_Delta``) and the count (``clipped_count_stddev``) as in Andrew et al.,
  Theorem 1, so that the two releases together cost what one release at ``z`` costs.
- Client-side clipping runs in the client runtime (``clip_upload``), because the framework packs many
  clients into one Flower message and Flower's ``fixedclipping_mod`` would clip the packed message.

What is not covered: the scalar metrics clients report with their updates (``train_loss``,
``loss_before``, ``num-examples``) are sent as they are, and under client-level DP the round's training
metrics are plain means over the clients (their weights are set to 1).

Sample level (``DPSGD``, ``privacy=dp_sgd``): DP-SGD (Abadi et al., arXiv 1607.00133, Algorithm 1) for
the local training of what is uploaded, with Opacus's ``GradSampleModule`` (per-example gradients) and
``DPOptimizer`` (per-example clipping to ``max_grad_norm``, Gaussian noise ``z max_grad_norm``). Each
client accounts its own steps at sample rate ``batch_size / n_k`` (RDP); its epsilon is reported per
client. Differences: minibatches are a shuffled partition of the client's data, not Poisson samples (the
accountant's assumption, as in most DP-SGD code); a personalization's own personal training
(fine-tuning, Ditto's personal model, FedRep's head, MaxFL's local model) runs without noise, since it
never leaves the device. The noise for ``epsilon`` is chosen as if the client trained in every round
(``max_trainings``, each training the steps it takes: epochs x batches, or ``simulation.local_steps``),
so no client spends more than ``epsilon``; clients sampled less spend less (the client sampling's
amplification is not counted).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping)
from torch import nn

from octomil_sim.client_app import PrivacyClient
from octomil_sim.errors import ConfigError
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

EPSILON = "epsilon"
CLIPPED = "clipped"  # a client-side clipped update: 1 when its norm was above the clipping norm


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int, key: str = "epsilon") -> float:
    """The noise multiplier ``z`` with which ``steps`` subsampled Gaussian releases at ``sample_rate``
    cost ``(epsilon, delta)`` under Opacus's RDP accountant (a ``ConfigError`` naming ``key`` when no
    noise can: the budget is too small)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant="rdp"))
    except ValueError as err:
        raise ConfigError(f"{key}={epsilon}: {str(err).splitlines()[0]} (delta {delta}, sample rate "
                          f"{sample_rate:.3g}, {steps} releases); allowed: a larger epsilon or delta") from None


def spent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after the releases in ``history``: (noise multiplier, sample rate, steps)
    triples (Opacus's RDP accountant); 0 with no release, inf with a noiseless one."""
    from opacus.accountants import RDPAccountant

    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def clip_scale(update_norm: float, clipping_norm: float) -> float:
    """The flat-clipping factor ``min(1, C / ||Delta||)`` (arXiv 1710.06963, Algorithm 1, ClipFn)."""
    return 1.0 if update_norm <= clipping_norm else clipping_norm / update_norm


def clip_upload(upload: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                clipping_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """(``received + clip(upload - received)`` over the uploaded arrays, whether it clipped): the
    client-side clipping of DP-FedAvg; arrays the client did not receive (none in practice) are
    rejected, since their update is undefined."""
    missing = [k for k in upload if k not in received]
    if missing:
        raise ValueError(f"client-side clipping: uploaded arrays {missing} were not received")
    deltas = {k: v.detach().cpu().double() - received[k].double() for k, v in upload.items()}  # (a GPU client's upload)
    norm = math.sqrt(sum(float((d ** 2).sum()) for d in deltas.values()))
    scale = clip_scale(norm, clipping_norm)
    clipped = {k: (received[k].double() + scale * d).to(upload[k].dtype) for k, d in deltas.items()}
    return clipped, scale < 1.0


@contextmanager
def numpy_seeded(seed: int):
    """NumPy's global generator seeded with ``seed`` inside the block, its state restored after."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class _ClientLevel:
    """What every client-level DP wrapper adds to Flower's (see the module docstring). Mixed in before
    the Flower wrapper class; attributes the wrapper lacks (``sent``, ``fairness``, ``average_arrays``)
    are the inner strategy's."""

    def _setup(self, epsilon, delta, noise_multiplier, num_clients, clients_per_round, rounds, seed):
        inner = self.strategy
        from strategies.fedavg import FedAvg

        allowed = "fairness=none with fedavg, finetune, ditto, personal_layers, pfedme, perfedavg, prompt_tuning"
        if not isinstance(inner, FedAvg) or inner.coefficient_step:
            raise ConfigError(f"privacy: strategy {type(inner).__name__} does not average its clients' updates "
                              f"(DP-FedAvg's noise is calibrated to an average); allowed: {allowed}")
        if getattr(inner, "fairness", None) is not None or getattr(inner, "reweights", False):
            raise ConfigError("privacy: the personalization or fairness policy weights its clients unequally "
                              f"(DP-FedAvg's sensitivity C/m holds for the plain average); allowed: {allowed}")
        if getattr(inner, "uploads_differ", False):
            raise ConfigError("privacy: the clients of this personalization upload different arrays (per-client "
                              f"layers or per-group models; one clipping norm bounds one shape of update); allowed: {allowed}")
        if getattr(inner, "sampling", "uniform") != "uniform" or getattr(inner, "train_all_clients", False):
            raise ConfigError("privacy: the accountant's subsampling needs uniform client sampling; allowed: "
                              "strategy.server.sampling=uniform and simulation.train_all_clients=false")
        self.delta, self.seed = delta, seed
        # the noise multiplier the accountant charges a round: z as asked (adaptive clipping splits it between
        # the update and the count, so the pair costs one release at z)
        self.accounted_noise = float(noise_multiplier)
        self.sample_rate = clients_per_round / num_clients
        self.history: list[list[float]] = []  # [noise multiplier, sample rate, releases]: what was released
        self.step_scale = max(1.0, float(getattr(inner, "beta", 1.0)))  # pFedMe's beta > 1 lengthens the step
        self.target_epsilon = epsilon
        self._uploaded: list[str] = []
        self._round = 0

    def __getattr__(self, name):
        if name == "strategy":  # not set yet
            raise AttributeError(name)
        return getattr(self.strategy, name)

    @property
    def round_state(self) -> tuple[str, ...]:
        own = ("history",) + (("clipping_norm",) if self.adaptive else ())
        return own + tuple(f"strategy.{n}" for n in getattr(self.strategy, "round_state", ()))

    adaptive = False

    @property
    def rounds_done(self) -> int:
        return int(sum(h[2] for h in self.history))

    @rounds_done.setter
    def rounds_done(self, count: int) -> None:
        """A checkpoint written before the history was kept saved only the count of releases: they were
        all at this run's noise multiplier."""
        self.history = [[float(self.accounted_noise), float(self.sample_rate), int(count)]] if count else []

    def epsilon(self) -> float:
        """Spent so far: every release at the noise it had (a run resumed with more rounds has a new z
        from then on, and the history composes both)."""
        return spent_epsilon([tuple(h) for h in self.history], self.delta)

    def privacy_report(self) -> dict:
        return {"level": "client", "epsilon": self.epsilon(), "delta": self.delta,
                "target_epsilon": self.target_epsilon, "noise_multiplier": self.accounted_noise,
                "clipping_norm": float(self.clipping_norm), "sample_rate": self.sample_rate,
                "releases": self.rounds_done, "accountant": "opacus.accountants.RDPAccountant"}

    def _prepare(self, server_round, replies) -> list:
        """The round's successful replies with equal weights (a failed client sends nothing: it counts
        as a zero update in the fixed-denominator average, ``_fixed_denominator``); remembers the
        uploaded array names."""
        valid = [r for r in replies if not r.has_error()]
        keys = {tuple(r.content[self.strategy.arrayrecord_key].keys()) for r in valid}
        if len(keys) > 1:
            raise ConfigError("privacy: the clients of a round upload different arrays (a per-group model); "
                              "allowed: personalizations whose clients all upload the same layers")
        self._uploaded = list(keys.pop()) if keys else []
        for r in valid:
            r.content["metrics"][self.strategy.weighted_by_key] = 1
        self._round = server_round
        self._sent = self.strategy.sent.to_torch_state_dict()  # what the updates are taken against
        return valid

    def _clip_replies(self, replies, clipping_norm: float) -> int:
        """Clip every reply's upload to ``clipping_norm`` around the arrays sent (``clip_upload``; a
        zero update stays as it is, where Flower's clipping helper divides by its norm); returns how
        many were clipped."""
        key, count = self.strategy.arrayrecord_key, 0
        for reply in replies:
            upload, was = clip_upload(reply.content[key].to_torch_state_dict(), self._sent, clipping_norm)
            reply.content[key] = ArrayRecord(upload)
            count += was
        return count

    def _fixed_denominator(self, arrays: ArrayRecord | None, replies: list) -> ArrayRecord | None:
        """The inner strategy's average over the m' replies that arrived, rescaled on the uploaded
        arrays to ``sent + (1/m) sum_k Delta_k`` with m the clients sampled (DP-FedAvg's fixed-
        denominator estimator, arXiv 1710.06963 Alg. 1): a client's influence stays C/m, what the
        noise is calibrated to, when a straggler or a dropout sends nothing."""
        m_seen, m = len(replies), self.num_sampled_clients
        if arrays is None or m_seen >= m:
            return arrays
        sent, new = self._sent, arrays.to_torch_state_dict()
        scale = m_seen / m
        return ArrayRecord({k: sent[k] + scale * (v - sent[k]) if k in self._uploaded else v for k, v in new.items()})

    def _restrict(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({k: arrays[k] for k in self._uploaded})

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's noise on the uploaded arrays only, drawn from (seed, round); the rest (a frozen base,
        layers kept personal) as the inner strategy returned them."""
        norm, self.clipping_norm = self.clipping_norm, self.clipping_norm * self.step_scale  # sensitivity beta C / m
        try:
            with numpy_seeded(self.seed * 1_000_003 + 7 * self._round + 3):
                noised = super()._add_noise_to_aggregated_arrays(self._restrict(aggregated_arrays))
        finally:
            self.clipping_norm = norm
        return ArrayRecord({k: noised[k] if k in noised else aggregated_arrays[k] for k in aggregated_arrays.keys()})

    def _release(self, server_round, replies, clip: bool):
        """One round of DP-FedAvg: equal weights, (with ``clip``) each update clipped here to this
        round's norm (else the clients clipped), the inner average, the fixed denominator, the noise at
        this round's norm, the accountant. Adaptive clipping (Andrew et al., Algorithm 1) also takes the
        noised share b of updates left unclipped and then moves the norm, ``C <- C exp(-eta (b - gamma))``.
        With no reply nothing is released."""
        replies = self._prepare(server_round, replies)
        if not replies or not validate_replies(replies, self.num_sampled_clients):
            return self._account(None, None)
        clipped = self._clip_replies(replies, self.clipping_norm) if clip else None
        if self.adaptive:
            if clipped is None:  # the clients clipped and said so
                clipped = sum(1 for r in replies if r.content["metrics"].get(CLIPPED, 0))
            with numpy_seeded(self.seed * 1_000_003 + 7 * server_round + 5):
                fraction = self._noisy_fraction(len(replies) - clipped, len(replies))
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        arrays = self._fixed_denominator(arrays, replies)
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        if self.adaptive:
            self._geometric_update(fraction)
        return self._account(arrays, metrics)

    def _account(self, arrays, metrics):
        if arrays is not None:
            entry = [float(self.accounted_noise), float(self.sample_rate)]
            if self.history and self.history[-1][:2] == entry:
                self.history[-1][2] += 1
            else:
                self.history.append([*entry, 1])
        metrics = metrics if metrics is not None else MetricRecord()
        metrics[EPSILON] = self.epsilon()
        return arrays, metrics


class ServerSideFixed(_ClientLevel, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping (Flower's wrapper), on the uploaded arrays."""

    def aggregate_train(self, server_round, replies):
        return self._release(server_round, replies, clip=True)


class ClientSideFixed(_ClientLevel, DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping: Flower's wrapper sends ``clipping_norm`` in the config record, the
    client runtime clips (``clip_upload``), the wrapper adds the noise."""

    def aggregate_train(self, server_round, replies):
        return self._release(server_round, replies, clip=False)  # the clients clipped


class ServerSideAdaptive(_ClientLevel, DifferentialPrivacyServerSideAdaptiveClipping):
    """Server-side adaptive clipping (Flower's wrapper; Andrew et al., Algorithm 1): the updates are
    clipped to this round's norm C, the noise is scaled by it, then ``C <- C exp(-eta (b - gamma))``
    with b the noised share of updates left unclipped (norm <= C) and gamma ``target_quantile``.
    Two differences from Flower's wrapper, which follow the paper: Flower feeds the share of *clipped*
    updates into that formula, which moves C the wrong way (all clipped: C shrinks further), and it
    moves C before adding the noise, so its noise is scaled by the next round's norm."""

    adaptive = True

    def aggregate_train(self, server_round, replies):
        return self._release(server_round, replies, clip=True)


class ClientSideAdaptive(_ClientLevel, DifferentialPrivacyClientSideAdaptiveClipping):
    """Client-side adaptive clipping: Flower's wrapper sends this round's ``clipping_norm``, each client
    clips its upload (``UploadClipping``) and reports ``clipped``; the norm then moves as in
    ``ServerSideAdaptive``, from the noised share of clients that were not clipped (Flower's own wrapper
    counts the clipped ones in that formula, and reads a norm bit its ``adaptiveclipping_mod`` sets per
    packed message)."""

    adaptive = True

    def aggregate_train(self, server_round, replies):
        return self._release(server_round, replies, clip=False)  # the clients clipped


CLIPPING = {"server_fixed": ServerSideFixed, "client_fixed": ClientSideFixed, "server_adaptive": ServerSideAdaptive,
            "client_adaptive": ClientSideAdaptive}


def ClientLevelDP(strategy, *, clipping: str = "server_fixed", epsilon: float | None = 4.0, delta: float = 1e-3,
                  noise_multiplier: float | None = None, clipping_norm: float = 1.0,
                  target_quantile: float = 0.5, clip_norm_lr: float = 0.2,
                  clipped_count_stddev: float | None = None, num_clients: int, clients_per_round: int,
                  rounds: int, seed: int = 0):
    """``strategy`` wrapped in client-level DP (``privacy.server`` in the config; the runner passes the
    federation's size, the rounds and the seed). Give ``epsilon`` (the noise multiplier is then the
    accountant's for ``rounds`` releases at ``delta``) or ``noise_multiplier`` (epsilon is reported)."""
    if clipping not in CLIPPING:
        raise ConfigError(f"privacy.server.clipping={clipping!r}: allowed: {', '.join(CLIPPING)}")
    if (epsilon is None) == (noise_multiplier is None):
        raise ConfigError(f"privacy.server.epsilon={epsilon}, privacy.server.noise_multiplier={noise_multiplier}: "
                          "allowed: exactly one of the two (the other null)")
    if epsilon is not None and not epsilon > 0:
        raise ConfigError(f"privacy.server.epsilon={epsilon}: allowed: a number > 0 (privacy=none for no DP)")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.server.delta={delta}: allowed: a number in (0, 1)")
    if not clipping_norm > 0:
        raise ConfigError(f"privacy.server.clipping_norm={clipping_norm}: allowed: a number > 0")
    if noise_multiplier is not None and noise_multiplier < 0:
        raise ConfigError(f"privacy.server.noise_multiplier={noise_multiplier}: allowed: a number >= 0")
    if not 0 <= target_quantile <= 1:
        raise ConfigError(f"privacy.server.target_quantile={target_quantile}: allowed: a number in [0, 1]")
    if not clip_norm_lr > 0:
        raise ConfigError(f"privacy.server.clip_norm_lr={clip_norm_lr}: allowed: a number > 0")
    q = clients_per_round / num_clients
    z = (noise_for_epsilon(epsilon, delta, q, rounds, key="privacy.server.epsilon") if epsilon is not None
         else float(noise_multiplier))
    cls = CLIPPING[clipping]
    if cls.adaptive:
        if z <= 0:
            raise ConfigError(f"privacy.server.noise_multiplier=0 with clipping={clipping}: allowed: > 0")
        count_std = clients_per_round / 20 if clipped_count_stddev is None else clipped_count_stddev  # paper: m/20
        if not count_std > z / 2:  # Flower's check (z_Delta^-2 = z^-2 - (2 sigma_b)^-2 > 0), in one line with the key
            raise ConfigError(f"privacy.server.clipped_count_stddev={count_std:g} (null: clients_per_round / 20): too "
                              f"low for the noise multiplier {z:.3g}; allowed: a value > {z / 2:.3g}")
        wrapper = cls(strategy, z, clients_per_round, initial_clipping_norm=clipping_norm,
                      target_clipped_quantile=target_quantile, clip_norm_lr=clip_norm_lr,
                      clipped_count_stddev=count_std)
    else:
        wrapper = cls(strategy, z, clipping_norm, clients_per_round)
    wrapper._setup(epsilon, delta, z, num_clients, clients_per_round, rounds, seed)
    return wrapper


#: the personalizations whose uploaded part DP-SGD trains (their local update is ``local_sgd``)
DP_SGD_WITH = "fedavg, finetune, ditto, personal_layers, prompt_tuning, and fairness strategies over fedavg"


def check_dp_sgd(client_algorithm: type) -> None:
    """``privacy=dp_sgd`` needs a client half whose upload is trained by ``local_sgd``."""
    from strategies.fedavg import FedAvgClient
    from strategies.personal_layers import PersonalLayersClient

    if not issubclass(client_algorithm, (FedAvgClient, PersonalLayersClient)):
        raise ConfigError(f"privacy=dp_sgd: strategy.client={client_algorithm.__name__} trains with its own "
                          f"update rule; allowed: {DP_SGD_WITH}")


class UploadClipping(PrivacyClient):
    """The client half of client-level DP: with ``clipping=client_fixed`` the wrapper sends the clipping
    norm in the config record and each client clips its upload here (``clip_upload``), reporting
    ``clipped``; otherwise it uploads as is."""

    def upload(self, upload, received, task):
        if KEY_CLIPPING_NORM not in task.config:
            return upload, {}
        clipped, was = clip_upload(upload, received, float(task.config[KEY_CLIPPING_NORM]))
        return clipped, {CLIPPED: int(was)}


class DPSGD(PrivacyClient):
    """Sample-level DP-SGD for a client's local training (``privacy.client``; see the module docstring).
    Give ``noise_multiplier``, or ``epsilon`` per client: each client then picks the noise that spends
    ``epsilon`` at ``delta`` if it trained in every round (``max_trainings`` = ``simulation.rounds``
    trainings of ``local_epochs`` epochs at sample rate ``batch_size / n_k``), so no client spends more,
    however often it is sampled (the client sampling's amplification is not counted)."""

    KEY = "dp_sgd"
    trains = True

    def __init__(self, epsilon: float | None = None, delta: float = 1e-3, noise_multiplier: float | None = None,
                 max_grad_norm: float = 1.0, max_trainings: int = 1):
        super().__init__(max_trainings)
        if (epsilon is None) == (noise_multiplier is None):
            raise ConfigError(f"privacy.client.epsilon={epsilon}, privacy.client.noise_multiplier={noise_multiplier}: "
                              "allowed: exactly one of the two (the other null)")
        if epsilon is not None and not epsilon > 0:
            raise ConfigError(f"privacy.client.epsilon={epsilon}: allowed: a number > 0 (privacy=none for no DP)")
        if not max_grad_norm > 0:
            raise ConfigError(f"privacy.client.max_grad_norm={max_grad_norm}: allowed: a number > 0")
        if not 0 < delta < 1:
            raise ConfigError(f"privacy.client.delta={delta}: allowed: a number in (0, 1)")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ConfigError(f"privacy.client.noise_multiplier={noise_multiplier}: allowed: a number >= 0")
        self.epsilon, self.delta, self.noise_multiplier = epsilon, delta, noise_multiplier
        self.max_grad_norm = max_grad_norm

    def noise(self, num_rows: int, batch_size: int, steps_per_training: int) -> float:
        """The noise multiplier of a client with ``num_rows`` training rows whose every training takes
        ``steps_per_training`` steps: given, or the one that spends ``epsilon`` over ``max_trainings``."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        q = min(1.0, batch_size / max(1, num_rows))
        steps = max(1, self.max_trainings * steps_per_training)
        return noise_for_epsilon(self.epsilon, self.delta, q, steps, key="privacy.client.epsilon")

    def sgd_epochs(self, model: nn.Module, x, y, epochs, batch_size, lr, generator, params=None, budget=None,
                   batches=None, state=None, anchor=None, lam=0.0) -> float:
        """``octomil_sim.training.sgd_epochs`` with per-example clipping and noise (Opacus), for the
        parameters in ``params`` (default: all trainable); counts the steps in the client's ``state``."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from torch.nn import functional as F

        from octomil_sim.training import minibatch_passes

        if anchor is not None:
            raise ConfigError("privacy=dp_sgd: a proximal local update is not supported; allowed: " + DP_SGD_WITH)
        moving = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        frozen = [p for p in model.parameters() if p.requires_grad and all(p is not m for m in moving)]
        for p in frozen:
            p.requires_grad_(False)
        z = self.noise(len(y), batch_size, len(batches) if batches is not None else epochs * math.ceil(len(y) / batch_size))
        wrapped = GradSampleModule(model)
        # the batches' draws untouched; on the data's device, where Opacus draws the noise (so a GPU run's
        # noise is another draw than a CPU run's, each a function of the seed)
        noise_gen = torch.Generator(device=x.device).manual_seed(generator.initial_seed() ^ 0x5EED)
        optimizer = DPOptimizer(torch.optim.SGD(moving, lr=lr), noise_multiplier=z, max_grad_norm=self.max_grad_norm,
                                expected_batch_size=batch_size, generator=noise_gen)
        wrapped.train()
        last, steps = 0.0, 0
        quiet = warnings.catch_warnings()
        quiet.__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no gradient
        try:
            for pass_batches in minibatch_passes(len(y), batch_size, epochs, generator, batches):
                total, seen = 0.0, 0
                for idx in pass_batches:
                    if budget is not None and not budget.take():
                        break
                    optimizer.zero_grad()
                    loss = F.cross_entropy(wrapped(x[idx]), y[idx])
                    loss.backward()
                    optimizer.step()
                    total, seen, steps = total + loss.item() * len(idx), seen + len(idx), steps + 1
                if seen:
                    last = total / seen
        finally:
            wrapped._close()  # the hooks off: the model is a plain module again
            for p in model.parameters():
                p.grad_sample = None
            for p in frozen:
                p.requires_grad_(True)
            quiet.__exit__(None, None, None)
        if state is not None:
            history = self.history(state)
            history.append((z, min(1.0, batch_size / max(1, len(y))), steps))
            state.save(self.KEY, {"history": torch.tensor(history, dtype=torch.float64)})
        return last

    def history(self, state) -> list[tuple[float, float, int]]:
        saved = state.load(self.KEY)
        return [] if saved is None else [(float(z), float(q), int(s)) for z, q, s in saved["history"].tolist()]

    def report(self, state) -> dict[str, float]:
        """The client's spent epsilon (at ``delta``) over every DP-SGD step it took."""
        return {EPSILON: spent_epsilon(self.history(state), self.delta)}

    def summary(self, clients: list[dict]) -> dict:
        """The largest and mean epsilon the clients spent, with the settings."""
        spent = [c[EPSILON] for c in clients if EPSILON in c]
        return {"level": "sample", "epsilon_max": max(spent, default=0.0),
                "epsilon_mean": sum(spent) / len(spent) if spent else 0.0, "epsilon": self.epsilon,
                "delta": self.delta, "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm}
