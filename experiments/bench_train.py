"""Train-step speed of lmjax against Hugging Face GPT2LMHeadModel of identical size on torch CPU, side by side.

Run:   python experiments/bench_train.py --config=configs/shakespeare_char_cpu.py [--rounds=5] [--steps=20]
         [--record=experiments/results.jsonl] [--no_peer] [--peer=hf|nanogpt|both] [--config.model.scan_layers=true ...]
What:  lmjax's real train step (`lmjax.bench.Runner`: Task.train_fn, AdamW, clipping, dropout as configured) and
       a torch step doing the same work: GPT2LMHeadModel (n_layer, n_head, n_embd, n_positions=max_len, vocab 65,
       exact-erf GELU, dropout as the config), cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW.
       torch.set_num_threads(--peer_threads, default all cores). The sides alternate in --rounds windows of --steps steps each, so a
       noisy shared host slows all alike; medians over all windows. nanoGPT ran ~1.23x HF GPT-2 on this recipe.
       --peer=nanogpt|both adds a GPT written here the way nanoGPT's model.py builds it (nn.Linear projections, fused
       qkv, F.scaled_dot_product_attention(is_causal=True), exact GELU, tied head, AdamW decaying 2-D weights only,
       eager, or torch.compile'd with --peer_compile as nanoGPT's train.py does by default): a same-day stand-in for
       nanoGPT, whose own script is not here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from lmjax import hostenv

if __name__ == '__main__':  # the allocator `lmjax` runs with (lmjax/hostenv.py), for lmjax and the peers alike
  hostenv.reexec_tuned([os.path.abspath(__file__), *sys.argv[1:]])

from lmjax import bench, config as config_lib, runtime  # pylint: disable=wrong-import-position


class TorchPeer:
  """HF GPT2LMHeadModel; subclasses replace `build` (model and optimizer) and `logits`, and share the step."""

  def __init__(self, config, threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, t, o = config.model, config.train, config.optimizer
    vocab = m.vocab_size or bench.CHAR_VOCAB
    self.torch, self.clip = torch, o.grad_clip
    self.model, self.opt = self.build(torch, m, o, vocab)
    self.batch = torch.randint(0, vocab, (t.batch_size, m.max_len))
    self.targets = torch.roll(self.batch, -1, dims=-1)

  def build(self, torch, m, o, vocab):
    import transformers
    hf = transformers.GPT2Config(vocab_size=vocab, n_positions=m.max_len, n_embd=m.d_model,
                                 n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.d_ff or None,
                                 activation_function='gelu', resid_pdrop=m.dropout, embd_pdrop=m.dropout,
                                 attn_pdrop=m.dropout, layer_norm_epsilon=m.norm_eps)
    model = transformers.GPT2LMHeadModel(hf).train()
    return model, torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                    weight_decay=o.weight_decay)

  def logits(self):
    return self.model(self.batch).logits

  def step(self):
    torch = self.torch
    logits = self.logits()
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


class NanoGPTPeer(TorchPeer):
  """nanoGPT's architecture in plain torch (this file's own code, not nanoGPT's); the step is TorchPeer's."""

  def build(self, torch, m, o, vocab):
    from torch import nn
    F = torch.nn.functional
    V, D, H, L, p = vocab, m.d_model, m.n_heads, m.max_len, m.dropout

    class Block(nn.Module):
      def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.drop = nn.Dropout(p)

      def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (z.view(B, T, H, D // H).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(D, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p if self.training else 0.0, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.down(F.gelu(self.up(self.ln2(x)))))

    class GPT(nn.Module):
      def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(L, D)
        self.blocks = nn.ModuleList(Block() for _ in range(m.n_layers))
        self.ln_f, self.drop = nn.LayerNorm(D), nn.Dropout(p)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight  # tied

      def forward(self, idx):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        for block in self.blocks:
          x = block(x)
        return self.head(self.ln_f(x))

    model = GPT().train()
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [{'params': [q for q in params if q.dim() >= 2], 'weight_decay': o.weight_decay},
              {'params': [q for q in params if q.dim() < 2], 'weight_decay': 0.0}]
    return model, torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)

  def logits(self):
    return self.model(self.batch)


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
  p.add_argument('--peer', choices=('hf', 'nanogpt', 'both'), default='both',
                 help='torch peers timed beside lmjax: HF GPT2LMHeadModel and/or the nanoGPT-architecture GPT')
  p.add_argument('--peer_threads', type=int, default=os.cpu_count(),
                 help="torch threads; on a host other jobs share, 2 OpenMP threads can stall on each other")
  p.add_argument('--peer_compile', action='store_true', help="torch.compile the nanoGPT-architecture peer's model")
  p.add_argument('--label', default='', help='free text stored with the record (what this run tries)')
  args = p.parse_args(rest)
  runtime.tune_host_allocator()
  config = config_lib.load(args.config, overrides)

  runner = bench.Runner(config)
  peers = {}
  if not args.no_peer:
    if args.peer in ('hf', 'both'):
      peers['hf'] = TorchPeer(config, args.peer_threads)
    if args.peer in ('nanogpt', 'both'):
      peers['nanogpt'] = NanoGPTPeer(config, args.peer_threads)
      if args.peer_compile:
        t0 = time.perf_counter()
        peers['nanogpt'].model = peers['nanogpt'].torch.compile(peers['nanogpt'].model)
        peers['nanogpt'].time(1)
        print(f'torch.compile of the nanoGPT-architecture peer: {time.perf_counter() - t0:.1f} s')
  K = runner.task.steps_per_call
  runner.time(2)
  for peer in peers.values():
    peer.time(2)
  ours, theirs = [], {name: [] for name in peers}
  for _ in range(args.rounds):
    ours += runner.time(max(1, args.steps // K))
    for name, peer in peers.items():
      theirs[name] += peer.time(args.steps)
  r = runner.result(ours)
  bench.print_result(r)
  extra = {'overrides': overrides, 'label': args.label, 'rounds': args.rounds, 'steps_per_window': args.steps,
           'peer_threads': args.peer_threads, 'peer_compile': args.peer_compile}
  B, L = config.train.batch_size, config.model.max_len
  titles = {'hf': 'HF GPT2LMHeadModel',
            'nanogpt': 'nanoGPT-architecture GPT' + (' (torch.compile)' if args.peer_compile else ' (eager)')}
  for name, peer in peers.items():
    peer_s = statistics.median(theirs[name])
    extra.update({f'{name}_ms_per_step': round(1e3 * peer_s, 3), f'{name}_tokens_per_s': round(B * L / peer_s, 1),
                  f'ratio_vs_{name}': round(peer_s * 1e3 / r['ms_per_step'], 3)})
    print(f'{titles[name]} (torch {peer.torch.__version__}, {peer.torch.get_num_threads()} threads): '
          f'{1e3 * peer_s:.2f} ms/step | {B * L / peer_s:,.0f} tokens/s | lmjax / it: '
          f'{extra[f"ratio_vs_{name}"]:.2f}x')
  if 'hf' in peers:
    extra['ratio_vs_nanogpt_est'] = round(extra['ratio_vs_hf'] / 1.23, 3)
    print(f'vs nanoGPT estimated as 1.23x HF (figures in the project brief): {extra["ratio_vs_nanogpt_est"]:.2f}x')
  if args.record:
    name = os.path.basename(args.config)
    with open(args.record, 'a') as f:
      f.write(json.dumps(bench.record_line(name, runner.config, r, **extra)) + '\n')


if __name__ == '__main__':
  main()
