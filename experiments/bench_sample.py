"""Sampler speed: tokens/s, time to first token and compile time of lmjax.sample.generate, against Hugging Face
transformers' GPT2LMHeadModel.generate of the same size on torch CPU when torch and transformers are importable.

Run:   python experiments/bench_sample.py [--batches=1,4,16] [--new_tokens=500] [--repeats=3] [--no_hf]
       [--max_len=64 --window_chunk=16]  (the CPU recipe's real context: 500 tokens by sliding window, no HF match)
Model: the CPU recipe's widths (4 layers, 4 heads, d_model 128, vocab 65) with max_len 1024 so 500 new tokens fit;
       random init (speed does not depend on the weights). Sampling: temperature 1, top_k 200 (as `lmjax sample`).
       Measured (2 shared cores, trained CPU recipe, max_len 64, batch 4, 500 tokens, steady state): sliding chunks
       of 16: ~1,280 tok/s; 8: ~810; 4: ~520 (one prefill per chunk); first call ~8 s more for compilation.
Timings are medians over --repeats runs (the host is shared and noisy). Goal (issue #5): >= 5x HF tokens/s at
batch 4 and <= 5 s sampler compile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from lmjax import hostenv

if __name__ == '__main__':  # the allocator `lmjax` runs with (lmjax/hostenv.py), for lmjax and the peer alike
  hostenv.reexec_tuned([os.path.abspath(__file__), *sys.argv[1:]])

import flax.linen as nn  # pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model as model_lib
from lmjax import sample

VOCAB, PROMPT_LEN, TOP_K = 65, 8, 200


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_lmjax(batches, new_tokens, repeats, staged=True, max_len=1024, window_chunk=0):
  cfg = model_lib.ModelConfig(vocab_size=VOCAB, max_len=max_len, n_layers=4, n_heads=4, d_model=128)
  params = nn.meta.unbox(model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(0)
  rows = {}
  for B in batches:
    prompts = [rng.integers(0, VOCAB, PROMPT_LEN).astype(np.int32) for _ in range(B)]
    run = lambda n, seed=0: sample.generate(
      params,
      cfg,
      prompts,
      max_new_tokens=n,
      temperature=1.0,
      top_k=TOP_K,
      seed=seed,
      staged=staged,
      window_chunk=window_chunk,
    )
    t = time.perf_counter()
    run(new_tokens)
    first = time.perf_counter() - t
    steady = _median_time(lambda: run(new_tokens, seed=1), repeats)
    run(1)  # compile the one-token program, then time it: prefill + first token
    ttft = _median_time(lambda: run(1, seed=1), repeats)
    rows[B] = dict(tok_s=B * new_tokens / steady, compile_s=first - steady, ttft_s=ttft, total_s=steady)
  return rows


def bench_hf(batches, new_tokens, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(
    vocab_size=VOCAB, n_positions=1024, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0
  )
  model = transformers.GPT2LMHeadModel(hf_cfg).eval()
  rows = {}
  for B in batches:
    ids = torch.randint(0, VOCAB, (B, PROMPT_LEN))
    kw = dict(
      use_cache=True, do_sample=True, top_k=TOP_K, temperature=1.0, pad_token_id=0, attention_mask=torch.ones_like(ids)
    )
    with torch.inference_mode():
      model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
      steady = _median_time(
        lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw), repeats
      )
      ttft = _median_time(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), repeats)
    rows[B] = dict(tok_s=B * new_tokens / steady, ttft_s=ttft, total_s=steady)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batches', default='1,4,16')
  p.add_argument('--new_tokens', type=int, default=500)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--no_hf', action='store_true')
  p.add_argument('--unstaged', action='store_true', help='one full-length cache (for comparison)')
  p.add_argument('--max_len', type=int, default=1024, help='below prompt + new_tokens: sliding-window generation')
  p.add_argument('--window_chunk', type=int, default=0, help='sliding-window chunk (0 = max_len // 4)')
  args = p.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  ours = bench_lmjax(
    batches,
    args.new_tokens,
    args.repeats,
    staged=not args.unstaged,
    max_len=args.max_len,
    window_chunk=args.window_chunk,
  )
  hf = None
  if not args.no_hf:
    try:
      hf = bench_hf(batches, args.new_tokens, args.repeats)
    except ImportError as e:
      print(f'(HF comparison skipped: {e})')
  print(
    f'{args.new_tokens} new tokens, prompt {PROMPT_LEN}, max_len {args.max_len}, top_k {TOP_K}, '
    f'median of {args.repeats}, '
    f'jax {jax.__version__} on {jax.devices()[0].platform}'
  )
  print('batch | lmjax tok/s | TTFT ms | compile s |  HF tok/s | HF TTFT ms | lmjax/HF')
  for B in batches:
    o = ours[B]
    h = hf[B] if hf else None
    hf_cols = f'{h["tok_s"]:9.0f} | {1e3 * h["ttft_s"]:10.1f} | {o["tok_s"] / h["tok_s"]:7.2f}x' if h else '- | - | -'
    print(f'{B:5d} | {o["tok_s"]:11.0f} | {1e3 * o["ttft_s"]:7.1f} | {o["compile_s"]:9.2f} | {hf_cols}')


if __name__ == '__main__':
  main()
