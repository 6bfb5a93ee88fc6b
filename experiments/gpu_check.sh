#!/usr/bin/env bash
# Issue #6's checks on one NVIDIA GPU, in one call of at most 10 minutes (a lent GPU's time is short): each step
# has its own time limit, so one failure leaves the others' results. Logs, step timestamps (steps.txt) and a
# results.jsonl go to $OUT (default gpu_out/).
#   1. `lmjax bench` of configs/gpu_1b.py (1.06B params, bf16, cuDNN attention): MFU against the tabled and the
#      measured bf16 matmul peak.
#   2. The numerics tests on the GPU (cuDNN attention against the reference, bf16 vs f32, scan, remat), with f32
#      matmuls at full precision so the float32 tolerances mean what they mean on CPU. Each test compiles for the
#      GPU (4-6 s a test on an H100), so the default 240 s covers about 50 of the 67; TESTS_TIMEOUT=900 runs all.
#   3. nanoGPT's GPU recipe end to end (configs/shakespeare_char.py, bf16 as nanoGPT's GPU default), real data
#      from $SHAKESPEARE_DIR: data pipeline, evals, checkpoints, val loss.
# Run from the repository root with lmjax importable:  bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
SHAKESPEARE_DIR=${SHAKESPEARE_DIR:-../shared/data/tinyshakespeare}

step() { echo; echo "=== $1 ($(date +%T))" | tee -a "$OUT/steps.txt"; }

step environment
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/env.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib.metadata as md, sys
print(sys.version.split()[0], *(f'{p}={md.version(p)}' for p in
      ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'numpy')))
import jax; print(jax.devices())
EOF

step 'bench configs/gpu_1b.py'
timeout 150 python3 -m lmjax bench --config=configs/gpu_1b.py --steps=10 --record="$OUT/results.jsonl" \
  2>&1 | tee "$OUT/bench_1b.log"

step 'numerics tests on the GPU'
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -v -p no:cacheprovider \
  tests/test_speed_features.py tests/test_model.py 2>&1 | tee "$OUT/pytest.log" | tail -25

step 'nanoGPT GPU recipe end to end'
rm -rf /tmp/lmjax_gpu_run
timeout 170 python3 -m lmjax train --config=configs/shakespeare_char.py --workdir=/tmp/lmjax_gpu_run \
  --config.data.manual_dir="$SHAKESPEARE_DIR" --config.data.data_dir=/tmp/lmjax_gpu_tfds \
  --config.model.dtype=bfloat16 --config.train.log_every=250 2>&1 | tee "$OUT/shakespeare_char.log" | tail -40
step done
