"""Train-step speed of lmjax against Hugging Face GPT2LMHeadModel of identical size on torch CPU, side by side.

Run:   python experiments/bench_train.py --config=configs/shakespeare_char_cpu.py [--rounds=5] [--steps=20]
         [--record=experiments/results.jsonl] [--no_peer] [--config.model.scan_layers=true ...]
What:  lmjax's real train step (`lmjax.bench.Runner`: Task.train_fn, AdamW, clipping, dropout as configured) and
       a torch step doing the same work: GPT2LMHeadModel (n_layer, n_head, n_embd, n_positions=max_len, vocab 65,
       exact-erf GELU, dropout as the config), cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW.
       torch.set_num_threads(--peer_threads, default all cores). The two alternate in --rounds windows of --steps steps each, so a
       noisy shared host slows both alike; medians over all windows. nanoGPT ran ~1.23x HF GPT-2 on this recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from lmjax import bench, config as config_lib, runtime


class TorchPeer:
  def __init__(self, config, threads):
    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, t, o = config.model, config.train, config.optimizer
    hf = transformers.GPT2Config(vocab_size=m.vocab_size or bench.CHAR_VOCAB, n_positions=m.max_len, n_embd=m.d_model,
                                 n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.d_ff or None,
                                 activation_function='gelu', resid_pdrop=m.dropout, embd_pdrop=m.dropout,
                                 attn_pdrop=m.dropout, layer_norm_epsilon=m.norm_eps)
    self.torch, self.clip = torch, o.grad_clip
    self.model = transformers.GPT2LMHeadModel(hf).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                 weight_decay=o.weight_decay)
    self.batch = torch.randint(0, hf.vocab_size, (t.batch_size, m.max_len))
    self.targets = torch.roll(self.batch, -1, dims=-1)

  def step(self):
    torch = self.torch
    logits = self.model(self.batch).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), self.targets.view(-1))
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()

  def time(self, steps):
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      self.step()
      times.append(time.perf_counter() - t)
    return times


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  from lmjax.cli import _split_overrides
  rest, overrides = _split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True)
  p.add_argument('--rounds', type=int, default=30)
  p.add_argument('--steps', type=int, default=2, help='optimizer steps per timed window (small: the two sides alternate often)')
  p.add_argument('--record', default='')
  p.add_argument('--no_peer', action='store_true')
  p.add_argument('--peer_threads', type=int, default=os.cpu_count(),
                 help="torch threads; on a host other jobs share, 2 OpenMP threads can stall on each other")
  p.add_argument('--label', default='', help='free text stored with the record (what this run tries)')
  args = p.parse_args(rest)
  runtime.tune_host_allocator()
  config = config_lib.load(args.config, overrides)

  runner = bench.Runner(config)
  peer = None if args.no_peer else TorchPeer(config, args.peer_threads)
  K = runner.task.steps_per_call
  runner.time(2)
  if peer:
    peer.time(2)
  ours, theirs = [], []
  for _ in range(args.rounds):
    ours += runner.time(max(1, args.steps // K))
    if peer:
      theirs += peer.time(args.steps)
  r = runner.result(ours)
  bench.print_result(r)
  extra = {'overrides': overrides, 'label': args.label, 'rounds': args.rounds, 'steps_per_window': args.steps,
           'peer_threads': args.peer_threads}
  if peer:
    B, L = config.train.batch_size, config.model.max_len
    hf_s = statistics.median(theirs)
    extra.update(hf_ms_per_step=round(1e3 * hf_s, 3), hf_tokens_per_s=round(B * L / hf_s, 1),
                 ratio_vs_hf=round(hf_s * 1e3 / r['ms_per_step'], 3),
                 ratio_vs_nanogpt_est=round(hf_s * 1e3 / r['ms_per_step'] / 1.23, 3))
    print(f'HF GPT2LMHeadModel (torch {peer.torch.__version__}, {peer.torch.get_num_threads()} threads): '
          f'{extra["hf_ms_per_step"]:.2f} ms/step | {extra["hf_tokens_per_s"]:,.0f} tokens/s')
    print(f'lmjax / HF tokens/s: {extra["ratio_vs_hf"]:.2f}x  (vs nanoGPT, estimated as 1.23x HF: '
          f'{extra["ratio_vs_nanogpt_est"]:.2f}x)')
  if args.record:
    name = os.path.basename(args.config)
    with open(args.record, 'a') as f:
      f.write(json.dumps(bench.record_line(name, runner.config, r, **extra)) + '\n')


if __name__ == '__main__':
  main()
