"""Command start to first training step on the CPU recipe: lmjax cold, lmjax rerun, and a plain Flax prototype.

Each figure is measured in a fresh process, from the process's start (as a user timing the command sees it) to the
moment the first training step starts (lmjax's own start-up line) or finishes (the prototype, which has no loop).
Runs alternate between the three so that a noisy host slows them alike; the medians are printed.

- lmjax cold: `lmjax train` with an empty compilation cache directory;
- lmjax rerun: the same command again (the train step and init come from the cache, untraced);
- prototype: ~40 lines of plain Flax Linen + Optax AdamW of the same model, jitted with donation, no data
  pipeline, checkpointing or logging: the floor that importing JAX, tracing and compiling put under any JAX run.

  python experiments/bench_startup.py --repeats=3 [--record=experiments/results.jsonl]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROTOTYPE = r"""
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax

class Block(nn.Module):
  d: int
  h: int
  @nn.compact
  def __call__(self, x):
    B, L, D = x.shape
    q, k, v = jnp.split(nn.Dense(3 * D)(nn.LayerNorm()(x)).reshape(B, L, 3 * self.h, D // self.h), 3, axis=2)
    s = jnp.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(D // self.h)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -1e9)
    x = x + nn.Dense(D)(jnp.einsum('bhqt,bthk->bqhk', jax.nn.softmax(s), v).reshape(B, L, D))
    return x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(nn.LayerNorm()(x)), approximate=False))

class GPT(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(65, 128)
    x = emb(tokens) + self.param('pos', nn.initializers.normal(0.02), (64, 128))
    for _ in range(4):
      x = Block(128, 4)(x)
    return emb.attend(nn.LayerNorm()(x))

model, tx = GPT(), optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.99, weight_decay=0.1))
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (12, 65)), jnp.int32)
params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])
opt_state = jax.jit(tx.init)(params)

@jax.jit
def step(params, opt_state, tokens):
  def loss(p):
    logits = model.apply(p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  value, grads = jax.value_and_grad(loss)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value

step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
params, opt_state, value = step(params, opt_state, tokens)
value.block_until_ready()
from lmjax import hostenv  # after the step: imports nothing heavy
print('FIRST_STEP', hostenv.seconds_since_process_start())
"""


def lmjax_first_step(cache_dir: str, workdir: str) -> float:
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [
    'lmjax',
    'train',
    '--config=configs/shakespeare_char_cpu.py',
    f'--workdir={workdir}',
    '--config.data.manual_dir=../shared/data/tinyshakespeare',
    '--config.train.steps=10',
    '--config.train.eval_every=10',
    '--config.train.checkpoint_every=10',
    '--config.train.log_every=10',
    '--config.train.progress_bar=false',
    f'--config.train.compilation_cache_dir={cache_dir}',
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
  return float(re.search(r'first step ([\d.]+)s after the command started', out).group(1))


def prototype_first_step() -> float:
  out = subprocess.run([sys.executable, '-c', PROTOTYPE], cwd=REPO, capture_output=True, text=True, check=True)
  return float(out.stdout.split('FIRST_STEP')[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--record', default='', help='append the medians as a JSON line to this file')
  args = p.parse_args()
  times = {'lmjax cold': [], 'lmjax rerun': [], 'prototype (no cache)': []}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.repeats):
      cache = os.path.join(tmp, f'cache{i}')
      times['lmjax cold'].append(lmjax_first_step(cache, os.path.join(tmp, 'run')))
      times['lmjax rerun'].append(lmjax_first_step(cache, os.path.join(tmp, 'run')))
      times['prototype (no cache)'].append(prototype_first_step())
      print(f'round {i + 1}: ' + ', '.join(f'{k} {v[-1]:.2f} s' for k, v in times.items()), flush=True)
  for k, v in times.items():
    print(f'{k:22s} median {statistics.median(v):5.2f} s  (min {min(v):.2f}, max {max(v):.2f}, n={len(v)})')
  if args.record:
    from lmjax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

    row = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'hardware': workdir_lib.hardware(),
      'git_commit': workdir_lib.git_commit(),
      'benchmark': 'start to first step, CPU recipe',
      **{k: {'median_s': statistics.median(v), 'all_s': v} for k, v in times.items()},
    }
    with open(args.record, 'a') as f:
      f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  main()
