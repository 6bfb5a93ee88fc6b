"""Hugging Face interop at GPT-2 124M's shape: `lmjax import-hf` and `lmjax export-hf` wall time and peak resident
memory (each a fresh process, as a user runs it), and logit parity with transformers in float32 over real text.

Run:   python experiments/bench_hf.py [--record=experiments/results.jsonl] [--dir=/tmp/bench_hf]
Model: GPT2LMHeadModel with GPT-2's config (12 layers, 12 heads, d_model 768, 1024 positions, vocab 50257), random
       weights, saved by transformers as safetensors, with a byte-level BPE tokenizer trained on Tiny Shakespeare.
Goal (issue #17): import and export each under 30 s and under 3x the model's bytes of peak memory; parity as the
       max abs logit difference and the KL divergence of the next-token distributions (HF || lmjax).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_hf  # noqa: E402  pylint: disable=wrong-import-position

GPT2_124M = dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12)


# Runs one command and prints its peak RSS: each command gets its own waiting parent, so readings never mix.
_PEAK = (
  'import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; '
  'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)'
)


def timed_command(args: list[str]) -> dict:
  """Wall seconds and peak resident memory (MiB) of `lmjax ARGS` in a fresh process, as a user runs it."""
  t0 = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, '-c', _PEAK, sys.executable, '-m', 'lmjax', *args],
    capture_output=True,
    text=True,
    env={**os.environ, 'HF_HUB_OFFLINE': '1'},
  )
  seconds = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f'{" ".join(args)} failed:\n{proc.stderr}')
  peak_kib = int(proc.stderr.strip().splitlines()[-1])
  return {'seconds': round(seconds, 2), 'peak_rss_mib': round(peak_kib / 1024, 1)}


def parity(hf_dir: str, workdir: str, rows: int = 4, length: int = 256) -> dict:
  import jax.numpy as jnp
  import torch
  import transformers

  from lmjax import inference, tokenizers

  tok = tokenizers.load(workdir)
  text = tiny_hf.read_shakespeare()
  ids = np.stack([tok.encode(text[i * 200_000 : i * 200_000 + 4_000])[:length] for i in range(rows)])
  m = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    want = m(torch.tensor(ids.astype(np.int64))).logits.numpy().astype(np.float64)
  _, _, engine, state = inference.load_run(workdir, ['mesh.data=1'])
  got = np.asarray(engine.model.apply({'params': state.params}, jnp.asarray(ids))).astype(np.float64)
  logp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  p_log, q_log = logp(want), logp(got)
  kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
  return {
    'tokens': int(ids.size),
    'max_abs_logit_diff': float(np.abs(want - got).max()),
    'kl_mean': float(kl.mean()),
    'kl_max': float(kl.max()),
    'same_argmax': float((want.argmax(-1) == got.argmax(-1)).mean()),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dir', default='/tmp/bench_hf')
  p.add_argument('--record', default='')
  args = p.parse_args()
  from lmjax import workdir as workdir_lib

  shutil.rmtree(args.dir, ignore_errors=True)
  src, wd, out = (os.path.join(args.dir, x) for x in ('hf', 'workdir', 'exported'))
  t0 = time.perf_counter()
  tiny_hf.save(src, 'gpt2', vocab_size=8000, model_vocab=50257, **GPT2_124M)
  print(f'built and saved the random GPT-2 124M in {time.perf_counter() - t0:.1f}s', flush=True)
  model_bytes = os.path.getsize(os.path.join(src, 'model.safetensors'))
  result = {
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'hardware': workdir_lib.hardware(),
    'git_commit': workdir_lib.git_commit(),
    'benchmark': 'HF interop, GPT-2 124M shape, random weights',
    'model_mib': round(model_bytes / 2**20, 1),
    'import': timed_command(['import-hf', f'--from={src}', f'--workdir={wd}']),
  }
  print('import', result['import'], flush=True)
  result['export'] = timed_command(['export-hf', f'--workdir={wd}', f'--to={out}'])
  print('export', result['export'], flush=True)
  for k in ('import', 'export'):
    result[k]['peak_over_model'] = round(result[k]['peak_rss_mib'] * 2**20 / model_bytes, 2)
  result['parity'] = parity(src, wd)
  result['exported_same_bytes'] = _same_tensors(src, out)
  print(json.dumps(result, indent=1))
  if args.record:
    with open(args.record, 'a') as f:
      f.write(json.dumps(result) + '\n')


def _same_tensors(a: str, b: str) -> bool:
  """Whether the exported safetensors hold exactly the imported tensors (bit for bit, float32)."""
  from safetensors.numpy import load_file

  x, y = load_file(os.path.join(a, 'model.safetensors')), load_file(os.path.join(b, 'model.safetensors'))
  x.pop('lm_head.weight', None)
  y.pop('lm_head.weight', None)
  return set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)


if __name__ == '__main__':
  main()
