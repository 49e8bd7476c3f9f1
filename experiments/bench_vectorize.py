"""Benchmark (not a test): one round of local training of 10 and 100 clients, the per-client
``training.sgd_epochs`` loop against ``cohort.cohort_sgd`` (the cohort trained together with
``torch.func``), on the same starts, data, seeds and settings, one torch thread, both measured in the
same run (median wall time of ``--repeats`` runs each). The last two columns are the largest absolute
differences between the two paths' final parameters and returned losses over all clients.

The workloads are the repository's Synthetic settings (client sizes from the data generators'
lognormal(4, 2) + 50 power law; features and labels are random, which does not change the time):

- q-FFL / TERM Synthetic(1, 1) (``conf/experiment/shared/fair_flearn_synthetic_1_1.yaml``): MLR,
  uncapped sizes (50 to 5,162 rows), 90% train, one epoch, batch 20, lr 0.05;
- Ditto's personal update on Synthetic(0.5, 0.5) (``ditto_synthetic.yaml``): MLR, sizes capped at
  1,000, 80% train, one epoch, batch 20, the prox step with lam 0.1 towards the global model;
- pFedMe Table 1 (``shared/pfedme_table1_synthetic.yaml``): sizes (lognormal + 50) x 5, 90% train,
  R = 20 local steps of batch 20 from the client's ``BatchStream``; MLR (lr 0.02) and the 60-20-10 DNN
  (lr 0.03);
- ``model=mlp`` (hidden 200) on the default Synthetic(0.5, 0.5): one epoch, batch 20, lr 0.05;
- not a repository setting: MLR on 20 to 400 rows drawn uniformly, 20 epochs of batch 10.

With 10 clients a round, the 10 are drawn uniformly from the 100 with a fixed seed.

A client's steps are sequential, so the cohort takes as many steps as its longest client: the
speed-up is at most about (total steps) / (max steps) times the cost of one client's step over the
cost of one cohort step (the third column gives both step counts).

    python experiments/bench_vectorize.py               # 10 and 100 clients, 5 repeats
    python experiments/bench_vectorize.py --repeats 3 --clients 100
    python experiments/bench_vectorize.py --device cuda # the GPU path (num_gpus_per_client > 0), block bench_vectorize_gpu

With ``--device cuda`` the data, the starts and both paths run on the GPU (what a client runtime with
``simulation.num_gpus_per_client > 0`` does); the table then also has the per-client loop on the CPU (one
thread, the plain loop's setting) as the baseline, and the LEAF FEMNIST CNN on 28x28 inputs (on the CPU its
cohort is slower than its loop, ``cohort.pays_off``). Times wait for the GPU (``torch.cuda.synchronize``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import check_block, write_block
from octomil_sim.client_app import FULL_FLOAT32, float_modes
from octomil_sim.cohort import cohort_sgd
from octomil_sim.models import MLP, MLR, FemnistCNN
from octomil_sim.training import BatchStream, sgd_epochs


@dataclass(frozen=True)
class Workload:
    name: str
    sizes: str          # fair_flearn (uncapped), capped (at 1,000) or pfedme (x 5)
    train_share: float
    hidden: tuple[int, ...] | None  # None: MLR
    lr: float
    epochs: int = 1
    local_steps: int | None = None  # BatchStream steps instead of epochs
    lam: float | None = None        # the prox step towards the start (Ditto's personal update)
    batch_size: int = 20
    cnn: bool = False               # LEAF's FEMNIST CNN on 1x28x28 inputs (62 classes) instead of MLR / MLP


WORKLOADS = [
    Workload("MLR, Synthetic(1,1) q-FFL/TERM, 1 epoch", "fair_flearn", 0.9, None, 0.05),
    Workload("MLR, Ditto personal (prox lam 0.1), 1 epoch", "capped", 0.8, None, 0.05, lam=0.1),
    Workload("MLR, pFedMe Table 1, 20 local steps", "pfedme", 0.9, None, 0.02, local_steps=20),
    Workload("MLP 60-20-10, pFedMe Table 1, 20 local steps", "pfedme", 0.9, (20,), 0.03, local_steps=20),
    Workload("MLP 60-200-10, Synthetic(0.5,0.5), 1 epoch", "capped", 0.8, (200,), 0.05),
    Workload("MLR, 20-400 rows, 20 epochs, batch 10", "uniform", 1.0, None, 0.05, epochs=20, batch_size=10),
]
FEATURES, CLASSES = 60, 10
CNN_WORKLOAD = Workload("LEAF FEMNIST CNN, 28x28, 1 epoch, batch 10", "uniform_small", 1.0, None, 0.05, batch_size=10,
                        cnn=True)


def client_sizes(kind: str, num_clients: int = 100) -> list[int]:
    """The generators' sizes: ``pfedme_synthetic_dataset`` (seed 0; x 5 for pFedMe, x 1 for
    fair_flearn) and ``synthetic_dataset`` (capped at 1,000); or uniform between 20 and 400."""
    if kind == "uniform":
        return np.random.default_rng(0).integers(20, 401, num_clients).tolist()
    if kind == "uniform_small":  # FEMNIST-like writers: tens of images each
        return np.random.default_rng(0).integers(20, 121, num_clients).tolist()
    if kind == "capped":
        sizes = np.minimum(np.random.default_rng(0).lognormal(4, 2, num_clients).astype(int) + 50, 1000)
    else:
        sizes = (np.random.RandomState(0).lognormal(4, 2, num_clients).astype(int) + 50) * (5 if kind == "pfedme" else 1)
    return sizes.tolist()


def inputs(work: Workload, clients: int, device: str = "cpu"):
    sizes = client_sizes(work.sizes)
    if clients < len(sizes):
        picked = np.random.default_rng(1).choice(len(sizes), clients, replace=False)
        sizes = [sizes[i] for i in sorted(picked)]
    sizes = [n - int(np.ceil(round((1 - work.train_share) * n, 9))) for n in sizes]  # minus the test rows
    torch.manual_seed(0)
    if work.cnn:
        model, shape, classes = FemnistCNN((1, 28, 28), 62), (1, 28, 28), 62
    else:
        shape, classes = (FEATURES,), CLASSES
        model = MLR(shape, classes) if work.hidden is None else MLP(shape, classes, work.hidden)
    xs = [torch.randn(n, *shape) for n in sizes]
    ys = [torch.randint(0, classes, (n,)) for n in sizes]
    model, xs, ys = model.to(device), [x.to(device) for x in xs], [y.to(device) for y in ys]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batches = None
    if work.local_steps is not None:
        batches = [BatchStream(n, work.batch_size).take(work.local_steps) for n in sizes]
    return model, xs, ys, start, batches


def per_client(model, xs, ys, start, batches, work: Workload):
    states, losses = [], []
    for k in range(len(xs)):
        model.load_state_dict(start)
        anchor = None if work.lam is None else [p.detach().clone() for p in model.parameters()]
        losses.append(sgd_epochs(model, xs[k], ys[k], work.epochs, work.batch_size, work.lr,
                                 torch.Generator().manual_seed(k),
                                 anchor=anchor, lam=work.lam or 0.0,
                                 batches=None if batches is None else batches[k]))
        states.append({n: v.clone() for n, v in model.state_dict().items()})
    return states, losses


def vectorized(model, xs, ys, start, batches, work: Workload):
    anchors = None if work.lam is None else [[start[n] for n, _ in model.named_parameters()]] * len(xs)
    return cohort_sgd(model, [start] * len(xs), xs, ys, epochs=work.epochs, batch_size=work.batch_size, lr=work.lr,
                      generators=[torch.Generator().manual_seed(k) for k in range(len(xs))],
                      anchors=anchors, lam=work.lam or 0.0, batches=batches)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        sync()
        begin = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), out


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def max_diffs(got, got_loss, ref, ref_loss) -> tuple[float, float]:
    diff = max((got[k][n].cpu() - ref[k][n].cpu()).abs().max().item() for k in range(len(ref)) for n in ref[k])
    return diff, max(abs(a - b) for a, b in zip(got_loss, ref_loss))


def main_gpu(args) -> None:
    """The ``--device cuda`` table: CPU loop, GPU loop, GPU cohort, one run."""
    import platform

    name = torch.cuda.get_device_name()
    if args.full_float32:  # what a GPU client runtime sets (client_app.client_device)
        float_modes(FULL_FLOAT32)
    modes = (f"TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} for matrix products, "
             f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'} for cuDNN convolutions"
             f"{'; deterministic cuDNN' if torch.backends.cudnn.deterministic else ''}")
    rows = [f"GPU: {name}, torch {torch.__version__} ({modes}); CPU: {platform.processor() or platform.machine()} "
            f"(one thread). {'One repetition' if args.repeats == 1 else f'Median of {args.repeats}'}; the last two "
            "columns compare the GPU cohort with the GPU loop.", "",
            "| workload | clients | steps per client (max / total) | CPU loop s | GPU loop s | GPU vectorized s "
            "| vectorized vs CPU loop | vs GPU loop | max \\|param diff\\| | max \\|loss diff\\| |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    print(rows[0], flush=True)
    for work in [w for w in [*WORKLOADS, CNN_WORKLOAD] if args.match in w.name]:
        for clients in args.clients:
            steps = None
            times = {}
            for device in ("cpu", "cuda"):
                model, xs, ys, start, batches = inputs(work, clients, device)
                steps = [work.local_steps if batches else work.epochs * -(-len(y) // work.batch_size) for y in ys]
                per_client(model, xs[:2], ys[:2], start, None if batches is None else batches[:2], work)  # warm-up
                times[device], (ref, ref_loss) = timed(lambda: per_client(model, xs, ys, start, batches, work), args.repeats)
            vectorized(model, xs[:2], ys[:2], start, None if batches is None else batches[:2], work)  # warm-up
            t_vec, (got, got_loss) = timed(lambda: vectorized(model, xs, ys, start, batches, work), args.repeats)
            diff, loss_diff = max_diffs(got, got_loss, ref, ref_loss)
            rows.append(f"| {work.name} | {clients} | {max(steps)} / {sum(steps)} | {times['cpu']:.3f} "
                        f"| {times['cuda']:.3f} | {t_vec:.3f} | {times['cpu'] / t_vec:.1f}x | {times['cuda'] / t_vec:.1f}x "
                        f"| {diff:.1e} | {loss_diff:.1e} |")
            print(rows[-1], flush=True)
    write_block(args.block, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--match", default="", help="only the workloads whose name holds this text")
    parser.add_argument("--full-float32", action="store_true", help="--device cuda: TF32 off and deterministic cuDNN, "
                        "as runs set them (default: PyTorch's defaults, as the README table was measured)")
    parser.add_argument("--block", help="the experiments/README.md block to write (default: bench_vectorize or, "
                        "with --device cuda, bench_vectorize_gpu)")
    args = parser.parse_args()
    args.block = args.block or ("bench_vectorize_gpu" if args.device == "cuda" else "bench_vectorize")
    check_block(args.block)
    torch.set_num_threads(1)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device=cuda: torch sees no CUDA device here; allowed: cpu")
        return main_gpu(args)
    rows = ["| workload | clients | steps per client (max / total) | per-client loop s | vectorized s | speed-up "
            "| max \\|param diff\\| | max \\|loss diff\\| |", "|---|---|---|---|---|---|---|---|"]
    for work in [w for w in WORKLOADS if args.match in w.name]:
        for clients in args.clients:
            model, xs, ys, start, batches = inputs(work, clients)
            steps = [work.local_steps if batches else work.epochs * -(-len(y) // work.batch_size) for y in ys]
            t_loop, (ref, ref_loss) = timed(lambda: per_client(model, xs, ys, start, batches, work), args.repeats)
            t_vec, (got, got_loss) = timed(lambda: vectorized(model, xs, ys, start, batches, work), args.repeats)
            diff, loss_diff = max_diffs(got, got_loss, ref, ref_loss)
            rows.append(f"| {work.name} | {clients} | {max(steps)} / {sum(steps)} | {t_loop:.3f} | {t_vec:.3f} "
                        f"| {t_loop / t_vec:.1f}x | {diff:.1e} | {loss_diff:.1e} |")
            print(rows[-1], flush=True)
    write_block(args.block, rows)


if __name__ == "__main__":
    main()
