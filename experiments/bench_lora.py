"""LoRA against full fine-tuning on a GPT-2-124M-shaped model, in lmjax and in HF peft + a plain torch loop.

  python experiments/bench_lora.py                   # 12 layers, d 768, vocab 50257, rows of 256, batch 4
  python experiments/bench_lora.py --layers=2 --d_model=128 --steps=3   # a smoke run

Random weights (saved once as a transformers GPT-2, which both sides load), the same random tokens, rank 8 on
q, k, v and o (PEFT: c_attn and attn.c_proj), AdamW. Each measurement runs in a fresh process, so its peak
resident memory is its own: lmjax full fine-tuning, lmjax LoRA, torch full fine-tuning, torch + peft LoRA. Step
time is the median of --steps timed steps after two warm-up steps; lmjax's checkpoint size is what one saved step
takes on disk. Prints one JSON line per measurement and a table, with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RANK, ALPHA = 8, 16.0


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _tokens(args):
  import numpy as np  # pylint: disable=import-outside-toplevel

  return np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1))


def lmjax_child(args) -> dict:
  """One lmjax measurement: full fine-tuning (--lora=0) or LoRA, from the saved model."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lmjax import checkpoint, config as config_lib, param_sources  # pylint: disable=import-outside-toplevel
  from lmjax.engine import Engine  # pylint: disable=import-outside-toplevel

  config = config_lib.default_config()
  source = param_sources.open_source(f'hf:{args.model}')
  config.train.init_from = f'hf:{args.model}'
  param_sources.adopt(source, config)
  config.train.batch_size, config.mesh.data = args.batch, 1
  config.optimizer.weight_decay = 0.0
  if args.lora:
    config.lora.rank, config.lora.alpha, config.lora.targets = RANK, ALPHA, ('q', 'k', 'v', 'o')
  config_lib.validate(config)
  engine = Engine(config)
  base = param_sources.init_params(source, engine.base_view(), config)
  if args.lora:
    engine.set_base(base)
    state = engine.init_state()
  else:
    state = engine.init_state(params=base)
  del base
  ids = _tokens(args)
  batch = {'inputs': ids[None, :, :-1].astype(np.int32), 'targets': ids[None, :, 1:].astype(np.int32)}
  t0 = time.perf_counter()
  compiled, _ = engine.compile_train({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
  compile_s = time.perf_counter() - t0
  step = engine.bind(compiled)
  batch = jax.device_put(batch, engine.batch_sharding)
  times = []
  for i in range(args.steps + 2):
    t = time.perf_counter()
    state, m = step(state, batch, engine.dropout_rng)
    jax.block_until_ready(m)
    if i >= 2:
      times.append(time.perf_counter() - t)
  where = tempfile.mkdtemp()
  try:
    with checkpoint.Checkpointer(where, async_save=False, data_iterator=False) as ckpt:
      ckpt.save(1, state, force=True)
      ckpt.wait()
    ckpt_bytes = checkpoint._disk_bytes_under(os.path.join(where, '1'))  # pylint: disable=protected-access
  finally:
    shutil.rmtree(where, ignore_errors=True)
  return {
    'who': 'lmjax',
    'run': f'LoRA r{RANK}' if args.lora else 'full',
    'step_s': statistics.median(times),
    'compile_s': compile_s,
    'peak_rss_mib': _peak_rss_mib(),
    'checkpoint_mib': ckpt_bytes / 2**20,
    'trained_params': int(engine.n_trainable),
    'loss': float(np.asarray(m['train_loss'])[-1]),
  }


def torch_child(args) -> dict:
  """One torch measurement: the HF model trained whole, or through peft's LoRA, by a plain loop."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(os.cpu_count())
  model = transformers.GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float32)
  if args.lora:
    import peft  # pylint: disable=import-outside-toplevel

    lc = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=['c_attn', 'attn.c_proj'], fan_in_fan_out=True)
    model = peft.get_peft_model(model, lc)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  ids = torch.tensor(_tokens(args)[:, :-1])
  times = []
  for i in range(args.steps + 2):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 2:
      times.append(time.perf_counter() - t)
  return {
    'who': 'torch' + (' + peft' if args.lora else ''),
    'run': f'LoRA r{RANK}' if args.lora else 'full',
    'step_s': statistics.median(times),
    'peak_rss_mib': _peak_rss_mib(),
    'trained_params': int(sum(p.numel() for p in params)),
    'loss': float(loss),
  }


def make_model(args, out: str) -> None:
  sys.path.insert(0, HERE)
  import tiny_hf  # pylint: disable=import-outside-toplevel

  shape = dict(n_positions=args.seq, n_embd=args.d_model, n_layer=args.layers, n_head=args.heads)
  tiny_hf.save(out, 'gpt2', text=tiny_hf.read_shakespeare()[:100_000], model_vocab=args.vocab, std=0.02, **shape)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=12)
  p.add_argument('--d_model', type=int, default=768)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--vocab', type=int, default=50257)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=5, help='timed steps, after two warm-up steps')
  p.add_argument('--only', default='', help='comma-separated subset of lmjax_full,lmjax_lora,torch_full,torch_peft')
  p.add_argument('--record', default='', help='append the results as JSON lines to this file')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--model', default='', help=argparse.SUPPRESS)
  p.add_argument('--lora', type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(lmjax_child(args) if args.child == 'lmjax' else torch_child(args)), flush=True)
    os._exit(0)  # pylint: disable=protected-access
  from lmjax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  runs = {
    'lmjax_full': ('lmjax', 0),
    'lmjax_lora': ('lmjax', 1),
    'torch_full': ('torch', 0),
    'torch_peft': ('torch', 1),
  }
  chosen = [r for r in runs if not args.only or r in args.only.split(',')]
  root = tempfile.mkdtemp()
  results = []
  try:
    model = os.path.join(root, 'gpt2')
    make_model(args, model)
    shape = [f'--{k}={getattr(args, k)}' for k in ('layers', 'd_model', 'heads', 'vocab', 'seq', 'batch', 'steps')]
    for name in chosen:
      child, lora = runs[name]
      cmd = [sys.executable, __file__, f'--child={child}', f'--model={model}', f'--lora={lora}', *shape]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode:
        print(f'{name} failed:\n{proc.stderr[-3000:]}', file=sys.stderr)
        continue
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      print(json.dumps(row), flush=True)
      results.append(row)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  cpu = f'{workdir_lib.cpu_model()} ({os.cpu_count()} cores, {workdir_lib.cpu_isa()})'
  print(f'\nGPT-2 shape: {args.layers} layers, d {args.d_model}, vocab {args.vocab}; batch {args.batch} x {args.seq}')
  print(f'CPU: {cpu}; {time.strftime("%Y-%m-%d")}')
  print(f'{"":22}{"step s":>8}{"peak RSS MiB":>14}{"ckpt MiB":>10}{"trained":>13}')
  for r in results:
    ckpt = f'{r["checkpoint_mib"]:.1f}' if 'checkpoint_mib' in r else '-'
    print(
      f'{r["who"] + " " + r["run"]:22}{r["step_s"]:8.2f}{r["peak_rss_mib"]:14.0f}{ckpt:>10}{r["trained_params"]:13,}'
    )
  if args.record:
    with open(args.record, 'a') as f:
      for r in results:
        f.write(json.dumps({**r, 'cpu': cpu, 'date': time.strftime('%Y-%m-%d'), 'argv': sys.argv[1:]}) + '\n')


if __name__ == '__main__':
  main()
