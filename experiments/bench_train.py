"""Train-step speed of lmjax against Hugging Face GPT2LMHeadModel of identical size on torch CPU, side by side.

Run:   python experiments/bench_train.py --config=configs/shakespeare_char_cpu.py [--rounds=5] [--steps=20]
         [--record=experiments/results.jsonl] [--no_peer] [--peer=hf|nanogpt|both] [--config.model.scan_layers=true ...]
What:  lmjax's real train step (`lmjax.bench.Runner`: Engine.train_fn, AdamW, clipping, dropout as configured) and
       a torch step doing the same work: GPT2LMHeadModel (n_layer, n_head, n_embd, n_positions=max_len, vocab 65,
       exact-erf GELU, dropout as the config), cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW.
       torch.set_num_threads(--peer_threads, default all cores). Each peer runs in a process of its own, so neither
       side touches the other's heap or threads (in one process, 3 GB of torch tensors made and freed between two
       lmjax steps slowed the next by 6-31%; --peer_in_process restores the old way). The sides alternate in
       --rounds windows of --steps steps each, so a noisy shared host slows all alike; medians over all windows.
       nanoGPT ran ~1.23x HF GPT-2 on this recipe.
       Each window starts with --rewarm untimed steps (default 1). On this Firecracker VM the kernel reports freed
       memory to the host (page_reporting) after ~2 s, so a side that sat idle while the others ran re-faults its
       temporaries through the host: a 6-layer/384 lmjax step took 17-18 s after 12 s idle against 12 s back to
       back, the same page-fault count but 16 s of kernel time instead of 3.5 s. Training never sits idle between
       steps, so the timed steps are the back-to-back ones; torch keeps its freed memory and barely notices.
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
import subprocess
import sys
import time

from lmjax import hostenv

if __name__ == '__main__':  # the allocator `lmjax` runs with (lmjax/hostenv.py), for lmjax and the peers alike
  hostenv.reexec_tuned([os.path.abspath(__file__), *sys.argv[1:]])

from lmjax import bench, config as config_lib  # pylint: disable=wrong-import-position


class TorchPeer:
  """HF GPT2LMHeadModel; subclasses replace `build` (model and optimizer) and `logits`, and share the step."""

  def __init__(self, config, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, t, o = config.model, config.train, config.optimizer
    vocab = m.vocab_size or bench.CHAR_VOCAB
    self.torch, self.clip = torch, o.grad_clip
    self.version, self.threads = torch.__version__, torch.get_num_threads()
    self.model, self.opt = self.build(torch, m, o, vocab)
    self.batch = torch.randint(0, vocab, (t.batch_size, m.max_len))
    self.targets = torch.roll(self.batch, -1, dims=-1)

  def build(self, torch, m, o, vocab):
    import transformers

    hf = transformers.GPT2Config(
      vocab_size=vocab,
      n_positions=m.max_len,
      n_embd=m.d_model,
      n_layer=m.n_layers,
      n_head=m.n_heads,
      n_inner=m.d_ff or None,
      activation_function='gelu',
      resid_pdrop=m.dropout,
      embd_pdrop=m.dropout,
      attn_pdrop=m.dropout,
      layer_norm_epsilon=m.norm_eps,
    )
    model = transformers.GPT2LMHeadModel(hf).train()
    return model, torch.optim.AdamW(
      model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )

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
    groups = [
      {'params': [q for q in params if q.dim() >= 2], 'weight_decay': o.weight_decay},
      {'params': [q for q in params if q.dim() < 2], 'weight_decay': 0.0},
    ]
    return model, torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)

  def logits(self):
    return self.model(self.batch)


PEERS = {'hf': TorchPeer, 'nanogpt': NanoGPTPeer}


class PeerProcess:
  """A torch peer in a process of its own, timed on request: neither side touches the other's heap, threads or
  allocator state. (The 1.5x slower lmjax steps first blamed on a torch step in the same process were mostly this
  VM's idle-memory effect; see --rewarm in the module docstring.) Blocked on its pipe between windows, it uses no
  CPU (sampled: 0% while lmjax runs)."""

  def __init__(self, name, argv, threads, compile_model):
    cmd = [sys.executable, os.path.abspath(__file__), f'--serve_peer={name}', f'--peer_threads={threads}', *argv]
    self.proc = subprocess.Popen(
      cmd + (['--peer_compile'] if compile_model else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    ready = json.loads(self._line())
    self.version, self.threads, self.compile_s = ready['torch'], ready['threads'], ready['compile_s']

  def _line(self):
    while True:  # torch and transformers may print their own lines first
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f'the torch peer process exited with {self.proc.wait()}')
      if line.startswith('{') or line.startswith('['):
        return line

  def time(self, steps):
    self.proc.stdin.write(f'{steps}\n')
    self.proc.stdin.flush()
    return json.loads(self._line())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def build_peer(name, config, threads, compile_model):
  """(peer, seconds torch.compile and its first step took; 0 when not compiled)."""
  peer = PEERS[name](config, threads)
  compile_s = 0.0
  if compile_model:
    t0 = time.perf_counter()
    peer.model = peer.torch.compile(peer.model)
    peer.time(1)
    compile_s = time.perf_counter() - t0
  return peer, compile_s


def serve_peer(name, config, threads, compile_model):
  """The peer process: builds the peer, says so, then times `n` steps for every `n` read from stdin."""
  peer, compile_s = build_peer(name, config, threads, compile_model)
  print(json.dumps({'torch': peer.version, 'threads': peer.threads, 'compile_s': compile_s}), flush=True)
  for line in sys.stdin:
    print(json.dumps(peer.time(int(line))), flush=True)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  from lmjax.cli import _split_overrides

  rest, overrides = _split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True)
  p.add_argument('--rounds', type=int, default=30)
  p.add_argument(
    '--steps', type=int, default=2, help='optimizer steps per timed window (small: the two sides alternate often)'
  )
  p.add_argument('--rewarm', type=int, default=1, help='untimed steps at the start of every window (docstring)')
  p.add_argument('--record', default='')
  p.add_argument('--no_peer', action='store_true')
  p.add_argument(
    '--peer',
    choices=('hf', 'nanogpt', 'both'),
    default='both',
    help='torch peers timed beside lmjax: HF GPT2LMHeadModel and/or the nanoGPT-architecture GPT',
  )
  p.add_argument(
    '--peer_threads',
    type=int,
    default=os.cpu_count(),
    help='torch threads; on a host other jobs share, 2 OpenMP threads can stall on each other',
  )
  p.add_argument('--peer_compile', action='store_true', help="torch.compile the nanoGPT-architecture peer's model")
  p.add_argument('--label', default='', help='free text stored with the record (what this run tries)')
  p.add_argument(
    '--peer_in_process',
    action='store_true',
    help="time the peers in lmjax's process (the old way; slows lmjax at large sizes)",
  )
  p.add_argument('--serve_peer', default='', help=argparse.SUPPRESS)  # set on the peer processes this one starts
  args = p.parse_args(rest)
  hostenv.tune_host_allocator()
  config = config_lib.load(args.config, overrides)
  if args.serve_peer:
    return serve_peer(args.serve_peer, config, args.peer_threads, args.peer_compile)

  runner = bench.Runner(config)
  peers = {}
  if not args.no_peer:
    for name in ('hf', 'nanogpt') if args.peer == 'both' else (args.peer,):
      compile_model = args.peer_compile and name == 'nanogpt'
      if args.peer_in_process:
        peers[name], compile_s = build_peer(name, config, args.peer_threads, compile_model)
      else:
        peers[name] = PeerProcess(
          name, [f'--config={args.config}', *(f'--config.{o}' for o in overrides)], args.peer_threads, compile_model
        )
        compile_s = peers[name].compile_s
      if compile_s:
        print(f'torch.compile of the nanoGPT-architecture peer: {compile_s:.1f} s')
  K = runner.engine.steps_per_call
  runner.time(2)
  for peer in peers.values():
    peer.time(2)
  ours, theirs = [], {name: [] for name in peers}
  for _ in range(args.rounds):
    runner.time(-(-args.rewarm // K))
    ours += runner.time(max(1, args.steps // K))
    for name, peer in peers.items():
      peer.time(args.rewarm)
      theirs[name] += peer.time(args.steps)
  r = runner.result(ours)
  bench.print_result(r)
  extra = {
    'overrides': overrides,
    'label': args.label,
    'rounds': args.rounds,
    'steps_per_window': args.steps,
    'rewarm': args.rewarm,
    'peer_threads': args.peer_threads,
    'peer_compile': args.peer_compile,
    'peer_in_process': args.peer_in_process,
  }
  where = "lmjax's process" if args.peer_in_process else 'own process'
  B, L = config.train.batch_size, config.model.max_len
  titles = {
    'hf': 'HF GPT2LMHeadModel',
    'nanogpt': 'nanoGPT-architecture GPT' + (' (torch.compile)' if args.peer_compile else ' (eager)'),
  }
  for name, peer in peers.items():
    peer_s = statistics.median(theirs[name])
    extra.update(
      {
        f'{name}_ms_per_step': round(1e3 * peer_s, 3),
        f'{name}_tokens_per_s': round(B * L / peer_s, 1),
        f'ratio_vs_{name}': round(peer_s * 1e3 / r['ms_per_step'], 3),
      }
    )
    print(
      f'{titles[name]} (torch {peer.version}, {peer.threads} threads, {where}): '
      f'{1e3 * peer_s:.2f} ms/step | {B * L / peer_s:,.0f} tokens/s | lmjax / it: '
      f'{extra[f"ratio_vs_{name}"]:.2f}x'
    )
  if 'hf' in peers:
    extra['ratio_vs_nanogpt_est'] = round(extra['ratio_vs_hf'] / 1.23, 3)
    print(f'vs nanoGPT estimated as 1.23x HF (figures in the project brief): {extra["ratio_vs_nanogpt_est"]:.2f}x')
  for peer in peers.values():
    if isinstance(peer, PeerProcess):
      peer.close()
  if args.record:
    name = os.path.basename(args.config)
    with open(args.record, 'a') as f:
      f.write(json.dumps(bench.record_line(name, runner.config, r, **extra)) + '\n')


if __name__ == '__main__':
  main()
