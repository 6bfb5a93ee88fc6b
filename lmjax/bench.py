"""`lmjax bench`: compile time, step time, tokens/s, TFLOP/s and MFU of a config's real train step.

No data and no checkpoints: random token batches of the config's shape go through the same `Engine.train_fn` the
training loop runs (steps_per_call, grad_accum, dropout and donation included). MFU is printed against two peaks:
XLA's matmul throughput in the model's compute dtype, measured in this process (a shared host drifts from the
table), and the table in lmjax/metrics.py (the steadier figure on a GPU, whose measured peak drifts from run to
run). experiments/bench_train.py adds the torch peer side by side.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import compiling, hostenv, metrics as metrics_lib, profiling, workdir as workdir_lib

CHAR_VOCAB = 65  # Tiny Shakespeare's character vocabulary: what the CPU recipes train on


def matmul_flops(dtype='float32', n: int = 0, repeats: int = 10) -> float:
  """Median FLOP/s of one jitted n x n x n matmul in `dtype` on random data: what this device delivers to XLA right
  now. n = 0: 1024 on CPU, 8192 on accelerators (smaller ones leave a GPU's units idle)."""
  n = n or (1024 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n**3 / statistics.median(times)


class Runner:
  """A config's Engine with its train step compiled and a random batch on device; `time(n)` runs n more calls."""

  def __init__(self, config):
    from lmjax import engine as engine_lib  # pylint: disable=import-outside-toplevel

    t_start = time.perf_counter()
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.vocab_size = config.model.vocab_size or CHAR_VOCAB
    self.config = config
    self.engine = engine = engine_lib.Engine(config)
    engine_lib.check_training(config, engine.mesh)
    batch = random_batch(engine.train_batch_spec(), engine.model_cfg.vocab_size)
    if engine.lora:  # random rows need no real base: a fresh init stands in for train.init_from's
      engine.set_base(engine.fresh_params())
    self.state = engine.init_state()
    self.init_s = time.perf_counter() - t_start
    self.exec, self.compile_s = engine.compile_train(batch)
    engine_lib.check_host_memory(self.exec)
    self.exec = engine.bind(self.exec)
    self.batch = jax.device_put(batch, engine.batch_sharding)
    self.time(1)
    self.first_step_s = time.perf_counter() - t_start  # start to the first step's result on the host

  def time(self, calls: int) -> list:
    """Seconds per optimizer step of each of `calls` calls (a call runs steps_per_call steps)."""
    times = []
    for _ in range(calls):
      t = time.perf_counter()
      self.state, self.metrics = self.exec(self.state, self.batch, self.engine.dropout_rng)
      jax.block_until_ready(self.metrics)
      times.append((time.perf_counter() - t) / self.engine.steps_per_call)
    return times

  def result(self, step_times) -> dict:
    K, B, L = self.engine.train_batch_shape
    step_s = statistics.median(step_times)
    tokens_per_s = B * L / step_s
    model_flops = tokens_per_s * self.engine.flops_per_token
    measured_peak = matmul_flops(self.engine.model_cfg.dtype)  # the compute dtype: bf16 units on accelerators
    tabled = metrics_lib.peak_flops_per_device(self.config.train.peak_flops) * jax.device_count()
    return {
      'n_params': self.engine.n_params,
      'batch': B,
      'length': L,
      'steps_per_call': K,
      'init_s': round(self.init_s, 3),
      'compile_s': round(self.compile_s, 3),
      'compile_origin': self.engine.executables.origin['train_step'],
      'start_to_first_step_s': round(self.first_step_s, 3),
      'ms_per_step': round(1e3 * step_s, 3),
      'tokens_per_s': round(tokens_per_s, 1),
      'model_tflops': round(model_flops / 1e12, 5),
      'matmul_dtype': str(self.engine.model_cfg.dtype),
      'matmul_gflops': round(measured_peak / 1e9, 2),
      'mfu_measured_peak': round(model_flops / measured_peak, 4),
      'tabled_peak_gflops': round(tabled / 1e9, 2),
      'mfu_tabled_peak': round(model_flops / tabled, 4),
      'final_loss': float(self.metrics['train_loss'][-1]),
    }


def random_batch(spec: dict, vocab_size: int, seed: int = 0) -> dict:
  """A batch of random tokens with the keys and shapes of `spec` (K x B x L). Packed keys hold what the packer
  makes of rows of two documents each, so the benchmark runs the program training runs."""
  rng = np.random.default_rng(seed)
  shape = next(iter(spec.values())).shape
  L = shape[-1]
  batch = {'inputs': rng.integers(0, vocab_size, shape, dtype=np.int32)}
  batch['targets'] = np.roll(batch['inputs'], -1, axis=-1)
  if 'segment_ids' in spec:
    first = np.arange(L) < L // 2
    batch['segment_ids'] = np.broadcast_to(np.where(first, 1, 2), shape).astype(np.int32)
    batch['positions'] = np.broadcast_to(np.where(first, np.arange(L), np.arange(L) - L // 2), shape).astype(np.int32)
    batch['weights'] = np.ones(shape, np.float32)
  missing = set(spec) - set(batch)
  assert not missing, f'random_batch makes no {missing}'
  return {k: batch[k].astype(spec[k].dtype) for k in spec}


def measure(config, steps: int = 30, warmup: int = 2, profile_dir: str = '') -> dict:
  """Compiles the config's train step and returns its numbers over `steps` calls after `warmup` more;
  `profile_dir`: a jax.profiler trace of the timed calls there (lmjax/profiling.py)."""
  runner = Runner(config)
  runner.time(warmup)
  with profiling.trace(profile_dir):
    times = runner.time(max(1, steps // runner.engine.steps_per_call))
  return runner.result(times)


def describe(config) -> dict:
  m = config.model
  return {
    'model': f'{m.n_layers}L/{m.n_heads}H/{m.d_model}d len {m.max_len} dropout {m.dropout}',
    'dtype': m.dtype,
    'scan_layers': m.scan_layers,
    'remat': m.remat,
    'attention': m.attention,
  }


def record_line(config_name: str, config, result: dict, **extra) -> dict:
  return {
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'hardware': workdir_lib.hardware(),
    'git_commit': workdir_lib.git_commit(),
    'allocator': hostenv.allocator(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'config': config_name,
    **describe(config),
    **result,
    **extra,
  }


def print_result(r: dict, label: str = 'lmjax'):
  print(
    f'{label}: {r["n_params"]:,} params | batch {r["batch"]} x {r["length"]} | steps/call {r["steps_per_call"]} | '
    f'{hostenv.allocator()}'
  )
  print(
    f'  compile {r["compile_s"]:.2f} s ({r["compile_origin"]}) | start to first step {r["start_to_first_step_s"]:.2f} s'
  )
  print(
    f'  {r["ms_per_step"]:.2f} ms/step (median) | {r["tokens_per_s"]:,.0f} tokens/s | '
    f'{1e3 * r["model_tflops"]:.2f} model GFLOP/s'
  )
  print(
    f'  MFU {100 * r["mfu_measured_peak"]:.1f}% of measured {r["matmul_dtype"]} matmul peak '
    f'{r["matmul_gflops"]:.1f} GFLOP/s | '
    f'{100 * r["mfu_tabled_peak"]:.1f}% of tabled peak {r["tabled_peak_gflops"]:.1f} GFLOP/s'
  )


def run(config, steps: int = 30, record: str = '', config_name: str = '', profile_dir: str = ''):
  """`lmjax bench`: measures, prints, and appends a JSON line to `record` when given."""
  compiling.enable_compilation_cache(config.train.compilation_cache_dir)
  r = measure(config, steps, profile_dir=profile_dir)
  print_result(r)
  if profile_dir:
    print(f'  trace of the timed steps in {profile_dir} (open it as lmjax/profiling.py says)')
  if record:
    with open(record, 'a') as f:
      f.write(json.dumps(record_line(config_name or '(cli)', config, r)) + '\n')
  return r
