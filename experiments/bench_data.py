"""Data pipeline speed next to the train step it feeds: is the input pipeline ever the bottleneck?

Run:   python experiments/bench_data.py [--manual_dir=../shared/data/tinyshakespeare] [--repeats=5]
Prints, for the CPU char recipe and the SentencePiece config: batches/s of the pipeline alone, train steps/s of
the compiled step on random batches of the same shape, and their ratio (>= 10x wanted); then the time to
tokenize all of Tiny Shakespeare with SentencePiece. Medians over --repeats (the machine may be shared).
"""

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from lmjax import config as config_lib, data, parallel, sources, engine as engine_lib  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), '..')


def median_rate(fn, n, repeats):
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(n)
    rates.append(n / (time.perf_counter() - t0))
  return statistics.median(rates)


def bench(name, config, n_batches, n_steps, repeats):
  d = data.make_data(config, process_index=0, process_count=1)
  with config.unlocked():
    config.model.vocab_size = config.model.vocab_size or d.tokenizer.vocab_size
  next(d.train_iter)  # warm: threads started, first documents read
  pipe = median_rate(lambda n: [next(d.train_iter) for _ in range(n)], n_batches, repeats)

  engine = engine_lib.Engine(config)
  K, B, L = engine.train_batch_shape
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, config.model.vocab_size, (K, B, L)).astype(np.int32) for k in ('inputs', 'targets')}
  batch = parallel.put_batch(batch, engine.batch_sharding)
  step, _ = engine.compile_train(batch)
  state = [engine.init_state()]

  def run(n):
    with parallel.activate(engine.mesh):
      for _ in range(n):
        state[0], m = step(state[0], batch, engine.dropout_rng)
      jax.block_until_ready(m)

  run(2)
  steps = median_rate(run, n_steps, repeats) * K
  print(
    f'{name:<26} pipeline {pipe:9.1f} batches/s | train step {steps:7.1f} steps/s | ratio {pipe / steps:7.1f}x '
    f'(B={B}, L={L})',
    flush=True,
  )


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--manual_dir', default=os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare'))
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args()
  over = [f'data.manual_dir={args.manual_dir}', 'train.progress_bar=false']
  bench(
    'char (cpu recipe)',
    config_lib.load(os.path.join(REPO, 'configs/shakespeare_char_cpu.py'), over),
    2000,
    10,
    args.repeats,
  )
  bench('spm bpe 1024', config_lib.load(os.path.join(REPO, 'configs/shakespeare_spm.py'), over), 2000, 10, args.repeats)
  c = config_lib.load(os.path.join(REPO, 'configs/shakespeare_spm.py'), over + ['data.rows=packed'])
  c.train.batch_size = 12
  d = data.make_data(c, process_index=0, process_count=1)
  next(d.train_iter)
  pipe = median_rate(lambda n: [next(d.train_iter) for _ in range(n)], 200, args.repeats)
  print(f'{"spm bpe 1024, packed rows":<26} pipeline {pipe:9.1f} batches/s (tokenizing in Grain threads)')

  tok = d.tokenizer
  text = ''.join(data._join(sources.documents(c.data, s)) for s in ('train', 'validation+test'))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    ids = tok.encode(text)
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  print(
    f'SentencePiece ({tok.model_type} {tok.vocab_size}) tokenizes all of Tiny Shakespeare ({len(text):,} chars -> '
    f'{len(ids):,} tokens, {len(text.encode()) / len(ids):.2f} bytes/token) in {t:.2f} s '
    f'({len(text) / t / 1e6:.1f} M chars/s)'
  )


if __name__ == '__main__':
  main()
