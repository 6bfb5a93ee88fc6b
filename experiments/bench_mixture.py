"""Can the data keep up? Tokens/s of a mixture's input pipeline on one host, with SentencePiece and with a Hugging
Face tokenizer, side by side with the train step of a 124M-shaped model (GPT-2 small: 12 layers, d 768, 12 heads,
length 1024, vocabulary 50,304) on this host's devices.

Run:   python experiments/bench_mixture.py [--manual_dir=../shared/data/tinyshakespeare] [--step_batch=1]
       [--data_batches=40] [--steps=3] [--read_threads=0,2]
The mixture: Tiny Shakespeare (70%) and the .py files of this Python's standard library (30%), packed rows of
1,024 tokens, read and tokenized in Grain threads (data.read_threads). Both tokenizers are trained here on the
mixture (8,000 pieces; no download): SentencePiece BPE through lmjax, and a byte-level BPE tokenizer.json (GPT-2's
scheme) through the `tokenizers` library. The train step runs on random tokens of the pipeline's shape (batch
--step_batch rows); on a CPU keep it small, on an accelerator use the batch you train with. Prints one line per
measurement, with the host CPU, and the ratio pipeline / step: above 1, one host's pipeline feeds that step.
"""

import argparse
import os
import statistics
import sys
import sysconfig
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from lmjax import config as config_lib, data, engine as engine_lib, mixture, parallel, sources, workdir  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), '..')
L = 1024
SHAPE_124M = ['model.n_layers=12', 'model.n_heads=12', 'model.d_model=768', f'model.max_len={L}']
SHAPE_124M += ['model.vocab_size=50304', 'model.dropout=0.0']


def mixture_overrides(manual_dir: str, data_dir: str) -> list[str]:
  stdlib = sysconfig.get_paths()['stdlib']
  entries = (
    {'name': 'shakespeare', 'weight': 0.7},
    {'name': 'code', 'weight': 0.3, 'dataset': 'text_files', 'train_split': f'{stdlib}/[a-s]*.py', 'eval_split': ''},
  )
  return [
    f'data.manual_dir={manual_dir}',
    f'data.data_dir={data_dir}',
    f'data.sources={entries!r}',
    'data.rows=packed',
    f'model.max_len={L}',
    'train.eval_max_batches=0',  # the eval split is one document: evaluated whole
    'train.eval_batch_size=8',
    'train.progress_bar=false',
  ]


def hf_tokenizer_json(text: str, out_dir: str, vocab_size: int) -> str:
  """A byte-level BPE tokenizer.json trained on `text` (GPT-2's scheme, <|endoftext|> as BOS and EOS)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator([text], trainer)
  path = os.path.join(out_dir, 'tokenizer.json')
  tok.save(path)
  return path


def pipeline_tokens_per_s(config, n_batches: int, batch: int) -> tuple[float, float]:
  """(median tokens/s of the pipeline over three runs of n_batches, seconds to build the data)."""
  with config.unlocked():
    config.train.batch_size = batch
  t0 = time.perf_counter()
  d = data.make_data(config, process_index=0, process_count=1)
  built = time.perf_counter() - t0
  next(d.train_iter)  # threads started, first documents read
  rates = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(n_batches):
      next(d.train_iter)
    rates.append(n_batches * batch * L / (time.perf_counter() - t0))
  return statistics.median(rates), built


def step_tokens_per_s(manual_dir: str, data_dir: str, batch: int, steps: int) -> tuple[float, float, int]:
  """(median tokens/s of the 124M-shaped train step, compile seconds, parameters) on random tokens."""
  over = [f'data.manual_dir={manual_dir}', f'data.data_dir={data_dir}', f'train.batch_size={batch}']
  config = config_lib.load(os.path.join(REPO, 'configs/tiny.py'), over + SHAPE_124M + ['train.progress_bar=false'])
  engine = engine_lib.Engine(config)
  K, B, _ = engine.train_batch_shape
  rng = np.random.default_rng(0)
  tokens = {k: rng.integers(0, 50304, (K, B, L)).astype(np.int32) for k in ('inputs', 'targets')}
  tokens = parallel.put_batch(tokens, engine.batch_sharding)
  t0 = time.perf_counter()
  step, _ = engine.compile_train(tokens)
  compile_s = time.perf_counter() - t0
  state = engine.init_state()
  times = []
  with parallel.activate(engine.mesh):
    for i in range(steps + 1):  # the first call warms up
      t0 = time.perf_counter()
      state, m = step(state, tokens, engine.dropout_rng)
      jax.block_until_ready(m)
      if i:
        times.append(time.perf_counter() - t0)
  return K * B * L / statistics.median(times), compile_s, engine.n_params


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--manual_dir', default=os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare'))
  p.add_argument('--data_batches', type=int, default=40, help='batches per timed pipeline run (three runs)')
  p.add_argument('--data_batch', type=int, default=8, help='rows per pipeline batch')
  p.add_argument('--step_batch', type=int, default=1, help='rows per train step (keep small on a CPU)')
  p.add_argument('--steps', type=int, default=3, help='timed train steps')
  p.add_argument('--read_threads', default='0,2', help='data.read_threads values to time, comma-separated')
  args = p.parse_args()
  print(f'host: {workdir.hardware()} | jax {jax.__version__} on {jax.default_backend()} | {workdir.git_commit()}')
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, 'tfds')
    over = mixture_overrides(args.manual_dir, data_dir)
    base = config_lib.load(os.path.join(REPO, 'configs/tiny.py'), over)
    sample = ''.join(
      data.DocumentEncoder.text(d)
      for s in mixture.sources(base)
      for docs in [sources.documents(s.data, s.data.train_split)]
      for d in (docs[i] for i in range(len(docs)))
    )[:2_000_000]
    spm = over + ['data.tokenizer=spm', 'data.spm_vocab_size=8000', 'data.spm_train_chars=2000000']
    spm += [f'data.tokenizer_dir={tmp}']
    hf = over + ['data.tokenizer=hf', f'data.hf_tokenizer={hf_tokenizer_json(sample, tmp, 8000)}']
    rates = {}
    for tok_name, overrides in (('SentencePiece BPE 8k', spm), ('HF byte-level BPE 8k', hf)):
      for threads in (int(t) for t in args.read_threads.split(',')):
        config = config_lib.load(os.path.join(REPO, 'configs/tiny.py'), overrides + [f'data.read_threads={threads}'])
        rate, built = pipeline_tokens_per_s(config, args.data_batches, args.data_batch)
        name = f'{tok_name}, {threads} threads'
        print(
          f'pipeline {name:<32} {rate:12,.0f} tokens/s per host ({args.data_batch} x {L} rows; data built in '
          f'{built:.1f} s)',
          flush=True,
        )
        rates[name] = rate
    step, compile_s, n_params = step_tokens_per_s(args.manual_dir, data_dir, args.step_batch, args.steps)
    print(
      f'train step {n_params / 1e6:.0f}M-param GPT-2 shape {step:12,.0f} tokens/s ({args.step_batch} x {L} rows, '
      f'{jax.device_count()} x {jax.devices()[0].device_kind}; compiled in {compile_s:.1f} s)'
    )
    for name, rate in rates.items():
      print(f'ratio pipeline / step, {name:<32} {rate / step:8.1f}x')


if __name__ == '__main__':
  main()
