"""Command start to first training step on the CPU recipe: lmjax cold, lmjax rerun, and a plain Flax prototype.

Each figure is measured in a fresh process, from the process's start (as a user timing the command sees it) to the
moment the first training step starts (lmjax's own start-up line) or finishes (the prototype, which has no loop).
Runs alternate between the three so that a noisy host slows them alike; the medians are printed.

- lmjax cold: `lmjax train` with an empty compilation cache directory;
- lmjax rerun: the same command again (the train step and init come from the cache, untraced);
- prototype: ~40 lines of plain Flax Linen + Optax AdamW of the same model, jitted with donation, no data
  pipeline, checkpointing or logging: the floor that importing JAX, tracing and compiling put under any JAX run.

  python experiments/bench_startup.py --repeats=3 [--record=experiments/results.jsonl]

With --phases it prints instead where each command's start-up goes (train cold, resumed and fresh warm; sample cold
and warm; eval), from the `lmjax timeline:` lines LMJAX_TIMELINE=1 makes every command print, beside the import
floor: a fresh interpreter importing JAX, Flax, Optax, Orbax, Grain and TFDS.
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
import time

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


IMPORT_FLOOR = 'import jax, flax, optax, orbax.checkpoint, grain, tensorflow_datasets, numpy'


def import_floor() -> float:
  """Wall seconds of a fresh interpreter importing lmjax's stack and exiting: what no command can go below."""
  t0 = time.perf_counter()
  subprocess.run([sys.executable, '-c', IMPORT_FLOOR], check=True)
  return time.perf_counter() - t0


def timeline(args: list[str]) -> dict:
  """{phase: seconds since the process started} of `lmjax ARGS` (hostenv.mark's lines), plus 'exit': the whole
  command's wall time as its caller sees it."""
  t0 = time.perf_counter()
  proc = subprocess.run(
    ['lmjax', *args], cwd=REPO, capture_output=True, text=True, env={**os.environ, 'LMJAX_TIMELINE': '1'}
  )
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f'lmjax {" ".join(args)} failed:\n{proc.stderr}')
  phases = dict(re.findall(r'lmjax timeline: (.+) ([\d.]+)s', proc.stderr))
  return {**{k: float(v) for k, v in phases.items()}, 'exit': round(wall, 3)}


def phases_of_commands(tmp: str) -> dict:
  """Each command's phases, cold (empty caches) and warm: train cold, extended, resumed after a kill and fresh; sample
  cold and warm; eval."""
  cache, run = os.path.join(tmp, 'phase_cache'), os.path.join(tmp, 'phase_run')
  train = [
    'train',
    '--config=configs/shakespeare_char_cpu.py',
    f'--workdir={run}',
    '--config.data.manual_dir=../shared/data/tinyshakespeare',
    '--config.train.eval_every=10',
    '--config.train.checkpoint_every=10',
    '--config.train.log_every=10',
    '--config.train.progress_bar=false',
    f'--config.train.compilation_cache_dir={cache}',
  ]
  sample = ['sample', f'--workdir={run}', '--prompt=ROMEO:', '--max_new_tokens=500', '--num_samples=4', '--seed=0']
  out = {'train cold': timeline(train + ['--config.train.steps=10'])}
  # Extending a finished run: a new train.steps is a new config (traced once), the same program (served).
  out['train extended, warm'] = timeline(train + ['--config.train.steps=20'])
  # Resuming after a kill: the same command again, from the checkpoint before the one the kill lost.
  shutil.rmtree(os.path.join(run, 'checkpoints', '20'))
  out['train resumed, warm'] = timeline(train + ['--config.train.steps=20'])
  shutil.rmtree(run)
  out['train fresh, warm'] = timeline(train + ['--config.train.steps=10'])
  out['sample cold'] = timeline(sample)  # the sampler's first compile for this shape
  out['sample warm'] = timeline(sample)
  out['eval warm'] = timeline(['eval', f'--workdir={run}'])
  return out


def median_phases(rounds: list[dict]) -> dict:
  """{command: {phase: median seconds}} over rounds of phases_of_commands."""
  return {
    name: {k: round(statistics.median(r[name][k] for r in rounds if k in r[name]), 3) for k in rounds[0][name]}
    for name in rounds[0]
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--record', default='', help='append the medians as a JSON line to this file')
  p.add_argument('--phases', action='store_true', help="each command's start-up phases (LMJAX_TIMELINE) instead")
  p.add_argument('--nanogpt', default='', help='with --phases: a nanoGPT checkout with out-shakespeare-char')
  args = p.parse_args()
  if args.phases:
    return print_phases(args.record, args.nanogpt, args.repeats)
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


def sample_against_nanogpt(nanogpt: str, run: str, tmp: str, repeats: int) -> dict:
  """Whole-command wall seconds of 4 x 500 sampled tokens, alternating: `lmjax sample` warm (its sampler cached),
  cold (a fresh cache: traced and compiled), and nanoGPT's sample.py (torch, CPU, no KV cache) on its own
  shakespeare_char checkpoint in NANOGPT/out-shakespeare-char (train.py config/train_shakespeare_char.py with
  --device=cpu --compile=False and the CPU recipe's sizes; sampling speed does not depend on the weights)."""
  lmjax = ['sample', f'--workdir={run}', '--prompt=ROMEO:', '--max_new_tokens=500', '--num_samples=4', '--seed=0']
  peer = [
    sys.executable,
    'sample.py',
    '--out_dir=out-shakespeare-char',
    '--device=cpu',
    '--compile=False',
    '--start=ROMEO:',
    '--num_samples=4',
    '--max_new_tokens=500',
  ]
  times = {'lmjax sample warm': [], 'lmjax sample cold': [], 'nanoGPT sample.py': []}
  for i in range(repeats):
    times['lmjax sample warm'].append(timeline(lmjax)['exit'])
    cold = lmjax + [f'--config.train.compilation_cache_dir={os.path.join(tmp, f"cold{i}")}']
    times['lmjax sample cold'].append(timeline(cold)['exit'])
    t0 = time.perf_counter()
    subprocess.run(peer, cwd=nanogpt, capture_output=True, check=True)
    times['nanoGPT sample.py'].append(round(time.perf_counter() - t0, 3))
    print(f'round {i + 1}: ' + ', '.join(f'{k} {v[-1]:.2f} s' for k, v in times.items()), flush=True)
  return times


def print_phases(record: str, nanogpt: str = '', repeats: int = 3):
  with tempfile.TemporaryDirectory() as tmp:
    floor, rounds = [], []
    for i in range(repeats):  # alternating, so that a noisy host slows every command alike
      floor.append(import_floor())
      rounds.append(phases_of_commands(os.path.join(tmp, f'round{i}')))
    commands = median_phases(rounds)
    peer = sample_against_nanogpt(nanogpt, os.path.join(tmp, 'round0', 'phase_run'), tmp, repeats) if nanogpt else {}
  print(f'import floor (fresh interpreter, {IMPORT_FLOOR!r}): median {statistics.median(floor):.2f} s')
  print(f'each command: the median of {repeats} rounds, in seconds since its process started')
  for name, phases in commands.items():
    print(f'{name:22s} ' + ' | '.join(f'{k} {v:.2f}' for k, v in phases.items()))
  for name, v in peer.items():
    print(f'{name:22s} median {statistics.median(v):5.2f} s  (all {v})')
  if peer:
    ratio = statistics.median(peer['nanoGPT sample.py']) / statistics.median(peer['lmjax sample warm'])
    print(f'lmjax sample (warm) is {ratio:.2f}x faster than nanoGPT sample.py as a whole command')
    commands['sample vs nanoGPT'] = peer
  if record:
    from lmjax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

    row = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'hardware': workdir_lib.hardware(),
      'git_commit': workdir_lib.git_commit(),
      'benchmark': 'start-up phases of lmjax commands, CPU recipe (seconds since the process started)',
      'import_floor_s': floor,
      **commands,
    }
    with open(record, 'a') as f:
      f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  main()
