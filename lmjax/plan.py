"""`lmjax plan`: what a config costs before you train it -- parameters, FLOPs, memory per device, and on a TPU slice
whether it fits and the compiler's own estimate of the step time.

Needs no dataset and runs nothing: parameter shapes come from `jax.eval_shape`, FLOPs from the one formula
(lmjax.model.flops_per_token), and memory from XLA's own buffer plan of the compiled train step, eval step and
sampler on the configured mesh. `--devices=8` simulates 8 CPU devices; `--topology=v5e-16` compiles for a TPU slice
from any host (libtpu, lmjax/topology.py), `--slices=2` for two of them over DCN:

  lmjax plan --config=configs/shakespeare_char.py --devices=8 --config.mesh.data=1 --config.mesh.fsdp=8
  lmjax plan --config=configs/c4.py --topology=v5e-16 [--slices=2] [--fit] [--json]

On TPU the compiled program's cost analysis carries `optimal_seconds`, the compiler's estimate of one run of it;
plan turns that into tokens/s and MFU, always labelled as the compiler's estimate (nothing was measured). XLA counts
a loop's body once (the K steps of train.steps_per_call, grad_accum's micro-batches, scanned layers), so when the
configured step loops, the estimate comes from unrolled 1- and 2-layer copies of one micro-batch step, extrapolated
to the model's layers (each layer is the same program); memory always comes from the configured program. A large
fsdp-sharded matmul becomes such a loop too (a windowed einsum), so a step holding one is estimated from copies
compiled without them (WHOLE_COST_OPTIONS). The cost model adds -1 s for each call it cannot cost (_UNCOSTED); plan
adds those back.
`--fit` searches the largest batch that fits (or, --fit=remat, the cheapest remat policy that fits the batch).
"""

from __future__ import annotations

import json
import math
import os
import re
import time

# Components of a parameter, by the first path entry below a block that names it (see lmjax/model.py paths).
_BLOCK_PARTS = {'attn': 'attention', 'mlp': 'mlp', 'ln1': 'norms', 'ln2': 'norms'}
_TOP_PARTS = {'embed': 'embeddings', 'pos_embed': 'embeddings', 'lm_head': 'embeddings', 'ln_f': 'norms'}
_MOSAIC = 'custom_call_target="tpu_custom_call"'  # a Pallas kernel compiled for TPU (Mosaic)
_CUDNN = 'custom_call_target="__cudnn$fmha'  # cuDNN's fused attention
# Custom calls the TPU cost model cannot cost: each adds exactly -1 s to optimal_seconds (docs/tpu.md shows how this
# was found). Both move no data worth costing: ConcatBitcast joins slices already laid out side by side (large
# sharded arrays), X64Combine packs two u32 words into a u64 (the rbg dropout key). Adding 1 s back per call leaves
# the cost of everything else.
_UNCOSTED = ('custom_call_target="ConcatBitcast"', 'custom_call_target="X64Combine"')
# XLA's TPU partitioner turns a large fsdp-sharded matmul and its collective into a "windowed einsum": a loop that
# computes one slice of the result per trip. The cost model counts a loop's body once, so each such matmul is costed
# as one trip of many (1/32 of the weight gradients on a 32-chip slice). The estimate's copies are compiled with
# these loops off, so every matmul is costed whole; memory still comes from the program as it would run.
_WINDOWED = re.compile(r'condition=%[\w.]*windowed_dot_general_cond')
WHOLE_COST_OPTIONS = {
  'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False,
  'xla_tpu_enable_windowed_einsum_for_all_gather': False,
}
REMAT_ORDER = ('none', 'save_dots', 'save_proj', 'full')  # from the least recomputation to the most


def run(args, overrides):
  import jax

  if args.devices or args.topology:  # before the first JAX call that starts a backend; TPU targets need no TPU
    jax.config.update('jax_platforms', 'cpu')
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)
  from lmjax import config as config_lib, topology

  if os.path.isdir(args.config):  # a workdir: the config its run recorded (an imported model's among them)
    from lmjax import workdir as workdir_lib

    config = workdir_lib.load_config(args.config, overrides)
  else:
    config = config_lib.load(args.config, overrides)
  notes = []
  devices = None
  with config.unlocked():
    if config.model.vocab_size == 0:
      spm = config.data.tokenizer == 'spm'
      config.model.vocab_size = args.vocab_size or (config.data.spm_vocab_size if spm else 65)
      source = (
        '--vocab_size'
        if args.vocab_size
        else 'data.spm_vocab_size, the SentencePiece size'
        if spm
        else "tiny_shakespeare's characters"
      )
      notes.append(
        f"model.vocab_size is 0 (the tokenizer's size at train time); planned with {config.model.vocab_size} "
        f'({source}; --vocab_size=N to change)'
      )
    if args.topology:
      devices = topology.devices(args.topology, args.slices)
      config.mesh.slices = args.slices
      config.train.compilation_cache_dir = ''  # executables of compile-only devices are not kept
  if args.fit:
    result = fit(config, devices, args.fit)
    print(json.dumps(result, indent=1) if args.json else fit_report(result, args, overrides))
  else:
    p = plan(config, devices)
    print(json.dumps(p, indent=1) if args.json else report(p, notes))


def plan(config, devices=None, estimate: bool = True, train_only: bool = False, compiler_options=None) -> dict:
  """The numbers `lmjax plan` prints, as a dict (tests and notebooks read it directly). `devices`: the mesh's
  devices (a TPU slice's from lmjax.topology); default this process's. A train step that does not fit comes back
  with fits=False and the compiler's message, never an exception. `train_only`: skip the eval step and sampler
  (a search's candidates and the estimate's copies need only the train step). `compiler_options`: XLA options
  for the train step's compile (the estimate's copies: WHOLE_COST_OPTIONS)."""
  import jax
  from lmjax import parallel, engine as engine_lib, topology

  engine = engine_lib.Engine(config, parallel.make_mesh(config.mesh, devices))
  engine_lib.check_training(config, engine.mesh)
  cfg = engine.model_cfg
  params = engine.base_abstract  # the model's parameters (with LoRA, the frozen base; the state holds adapters)
  K, B, L = engine.train_batch_shape
  batch_spec = engine.train_batch_spec()  # the keys training feeds the step (packed rows add segments, positions)
  device = engine.mesh.devices.flat[0]
  chip = topology.chip_of(device)
  out = {
    'mesh': dict(engine.mesh.shape),
    'slices': int(config.mesh.get('slices', 1)),
    'n_devices': engine.mesh.size,
    'device_kind': device.device_kind,
    'platform': device.platform,
    'hbm_bytes': chip.hbm_bytes if chip else None,
    'attention_config': cfg.attention,
    'params': count_by_component(params, cfg.n_layers),
    'n_params': engine.n_params,
    'flops_per_token': engine.flops_per_token,
    'tokens_per_step': B * L,
    'batch_size': B,
    'remat': cfg.remat,
    'batch_keys': sorted(batch_spec),
    'bytes_per_device': {'params': device_bytes(params), 'optimizer': device_bytes(engine.abstract_state.opt_state)},
  }
  out['train_step'] = _compiled_stats(lambda: engine.compile_train(batch_spec, compiler_options), out['hbm_bytes'])
  out['fits'] = out['train_step']['fits']
  if out['fits'] and not train_only:
    eval_spec = {k: jax.ShapeDtypeStruct((config.train.eval_batch_size, L), v.dtype) for k, v in batch_spec.items()}
    eval_spec['weights'] = jax.ShapeDtypeStruct((config.train.eval_batch_size, L), 'float32')
    out['eval_step'] = _compiled_stats(lambda: _compile_eval(engine, eval_spec), out['hbm_bytes'])
    out['sample_step'] = _compiled_stats(lambda: _compile_sample(engine), out['hbm_bytes'])
  out['attention'] = _kernel(out['train_step'])
  out['compile_s'] = out['train_step']['compile_s']
  if estimate and out['fits']:
    out['estimate'] = _estimate(config, devices, out)
  return out


def _compile_eval(engine, spec):
  from lmjax import parallel  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  batch = {k: v.update(sharding=engine.eval_batch_sharding) for k, v in spec.items()}
  with parallel.activate(engine.mesh):
    compiled = engine.eval_fn.lower(engine.base_abstract, batch).compile()
  return compiled, time.perf_counter() - t0


def _compile_sample(engine):
  """The sampler `lmjax sample` would run with the config's sample.* options on a prompt that fills the context
  (max_len - sample.max_new_tokens tokens, or a sliding window's), so its cache is the largest those options make."""
  from lmjax import parallel, sample  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  s, cfg = engine.config.sample, engine.model_cfg
  prompt_len = max(1, cfg.max_len - s.max_new_tokens)
  fn, args = sample.abstract_program(engine.base_abstract, cfg, engine.mesh, s, prompt_len)
  with parallel.activate(engine.mesh):
    compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _compiled_stats(compile_fn, hbm_bytes) -> dict:
  """Memory, cost and kernels of `compile_fn()`'s (executable, seconds); fits=False with the compiler's message
  when XLA refuses the program for want of memory (TPU compiles check it against the chip's HBM)."""
  from lmjax import errors, engine as engine_lib  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  try:
    compiled, seconds = compile_fn()
  except Exception as e:  # pylint: disable=broad-except  -- only XLA's out-of-memory refusal is a result
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return {'fits': False, 'oom': errors.one_line(e), 'compile_s': time.perf_counter() - t0}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  total = engine_lib.step_bytes_per_device(mem)
  uncosted = sum(text.count(c) for c in _UNCOSTED)
  seconds_xla = cost.get('optimal_seconds')
  return {
    'fits': hbm_bytes is None or total is None or total <= hbm_bytes,
    'compile_s': seconds,
    'arguments': getattr(mem, 'argument_size_in_bytes', None),
    'outputs': getattr(mem, 'output_size_in_bytes', None),
    'aliased': getattr(mem, 'alias_size_in_bytes', None),
    'temporaries': getattr(mem, 'temp_size_in_bytes', None),
    'total': total,
    'flops': cost.get('flops'),
    'optimal_seconds': seconds_xla,  # as XLA gave it
    'uncosted_calls': uncosted,
    'compiler_seconds': None if seconds_xla is None else seconds_xla + uncosted,  # the -1 per uncosted call undone
    'windowed_loops': len(_WINDOWED.findall(text)),
    'mosaic_calls': text.count(_MOSAIC),
    'cudnn_calls': text.count(_CUDNN),
  }


def _kernel(stats: dict) -> str | None:
  """The attention kernel the compiled program holds (the program itself says, not the config)."""
  if not stats.get('fits') and 'mosaic_calls' not in stats:
    return None
  return 'splash' if stats['mosaic_calls'] else 'cudnn' if stats['cudnn_calls'] else 'xla'


def _estimate(config, devices, p) -> dict | None:
  """The compiler's step time and what it implies (tokens/s, MFU), or None where XLA gives no estimate (CPU)."""
  from lmjax import metrics  # pylint: disable=import-outside-toplevel

  t, tc = config.model, config.train
  loops = t.scan_layers or tc.steps_per_call > 1 or tc.grad_accum > 1
  how = 'the compiled train step'
  s = p['train_step']
  counted = s.get('flops') or 0.0
  seconds = s['compiler_seconds']
  if seconds is None:
    return None
  windowed = s.get('windowed_loops', 0)
  if (loops or windowed) and seconds > 0:
    # One micro-batch step, unrolled, at 1 and 2 layers: XLA counts a loop body once, and layers add alike.
    per_layers = []
    for n in (1, 2):
      c = _variant(config, **{'model.n_layers': n, 'model.scan_layers': False, 'train.steps_per_call': 1})
      with c.unlocked():
        c.train.batch_size, c.train.grad_accum = tc.batch_size // tc.grad_accum, 1
      options = WHOLE_COST_OPTIONS if windowed else None
      per_layers.append(plan(c, devices, estimate=False, train_only=True, compiler_options=options)['train_step'])
    one, two = (x.get('compiler_seconds') or 0.0 for x in per_layers)
    seconds = tc.grad_accum * (one + (t.n_layers - 1) * (two - one))
    f1, f2 = (x.get('flops') or 0.0 for x in per_layers)
    counted = tc.grad_accum * (f1 + (t.n_layers - 1) * (f2 - f1))
    how = f'unrolled 1- and 2-layer copies of one micro-batch step, extrapolated to {t.n_layers} layers'
    if windowed:
      how += f', compiled without windowed einsums so each matmul is costed whole ({windowed} such loops in the step)'
  if seconds <= 0:  # an op the cost model cannot cost that _UNCOSTED does not name
    return {'step_s': None, 'optimal_seconds': s['optimal_seconds'], 'uncosted_calls': s['uncosted_calls']}
  tokens_per_s = p['tokens_per_step'] / seconds
  peak = metrics.peak_flops_per_device(tc.peak_flops, p['device_kind']) * p['n_devices']
  return {
    'step_s': seconds,
    'tokens_per_s': tokens_per_s,
    'mfu': p['flops_per_token'] * tokens_per_s / peak if peak == peak else None,
    'from': how,
    # The cost model's FLOPs per chip against the formula's (which leaves out remat's recomputation): a check on
    # how much of the program it saw. Mosaic kernels (splash) are opaque to it, so their FLOPs are missing.
    'flops_counted': counted / (p['flops_per_token'] * p['tokens_per_step'] / p['n_devices']),
    'uncosted_calls': s['uncosted_calls'],
  }


def _variant(config, **fields):
  """A copy of `config` with dotted fields replaced (a search's candidate)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for dotted, value in fields.items():
      group, name = dotted.split('.')
      c[group][name] = value
  return c


# ---------------------------------------------------------------------------------------------- --fit


def fit(config, devices=None, what: str = 'batch', max_compiles: int = 10) -> dict:
  """The largest train.batch_size that fits (what='batch'), or the least-recomputing remat policy that fits the
  configured batch (what='remat'), found by compiling candidates; returns the search and its result. Memory is
  the chip's HBM on TPU (the compiler refuses what exceeds it) and the host's memory per device on CPU."""
  from lmjax import hostenv, parallel  # pylint: disable=import-outside-toplevel

  tried = []  # {field: value, 'fits', 'total' (bytes per device; from the compiler's message when it refused)}

  def fits(**fields) -> bool:
    p = plan(_variant(config, **fields), devices, estimate=False, train_only=True)
    budget = p['hbm_bytes'] or (hostenv.memory_bytes() or 0) // p['n_devices']
    s = p['train_step']
    total = s.get('total') or _required_bytes(s.get('oom', ''), tried)
    ok = p['fits'] and (not budget or total <= budget)
    tried.append({**fields, 'fits': ok, 'total': total, 'temps': s.get('temporaries'), 'hbm': budget})
    return tried[-1]['fits']

  if what == 'remat':
    best = next((r for r in REMAT_ORDER if fits(**{'model.remat': r})), None)
    return {'what': 'remat', 'best': best, 'tried': tried, 'compiles': len(tried)}
  mesh = parallel.make_mesh(config.mesh, devices)
  unit = mesh.shape['data'] * mesh.shape['fsdp'] * config.train.grad_accum  # batch sizes the mesh can split
  b = max(unit, config.train.batch_size // unit * unit)
  while b is not None and len(tried) < max_compiles:
    fits(**{'train.batch_size': b})
    b = _next_batch(tried, unit)
  lo = max((t['train.batch_size'] for t in tried if t['fits']), default=None)
  return {'what': 'batch', 'best': lo, 'unit': unit, 'tried': tried, 'compiles': len(tried)}


def _required_bytes(message: str, tried) -> int | None:
  """Bytes per device of a program the TPU compiler refused: the temporaries its message names, plus the
  arguments of the last program that fitted (the state, which does not grow with the batch)."""
  m = re.search(r'HLO temporaries \(([\d.]+)G\)', message)
  if not m:
    return None
  args = next((t['total'] - t['temps'] for t in reversed(tried) if t.get('temps')), 0)
  return int(float(m[1]) * (1 << 30)) + args


def _next_batch(tried, unit):
  """The next batch to compile, or None when the search is done (the largest fit and the smallest failure are a
  unit or 5% apart). Memory grows about linearly in the batch: below the budget, grow by what the budget allows
  (x2 to x8, along the line through the two largest fits once there are two: small batches' plans are noisy); once
  bracketed, where the line through the bracket meets the budget, kept 5% inside it."""
  fit_b = [(t['train.batch_size'], t['total']) for t in tried if t['fits']]
  bad_b = [(t['train.batch_size'], t['total']) for t in tried if not t['fits']]
  budget = tried[-1]['hbm']
  lo, m_lo = max(fit_b) if fit_b else (0, None)
  hi, m_hi = min(bad_b) if bad_b else (None, None)
  if not lo:
    return None if hi <= unit else max(unit, hi // 2 // unit * unit)
  if hi is None:
    grow = budget / m_lo if budget and m_lo else 2.0
    (b1, m1), (b2, m2) = sorted(fit_b)[-2:] if len(fit_b) > 1 else ((0, 0), (0, 0))
    if budget and m2 > m1:  # the line through the two largest fits, where it meets the budget
      grow = (b2 + (budget - m2) * (b2 - b1) / (m2 - m1)) / lo
    return int(lo * min(8.0, max(2.0, grow))) // unit * unit
  tol = max(unit, 0.05 * lo)
  if hi - lo <= tol:
    return None
  b = (lo + hi) / 2
  if budget and m_hi and m_hi > m_lo:
    b = lo + (budget - m_lo) * (hi - lo) / (m_hi - m_lo)
  # At least `tol` inside both ends, so every compile narrows the bracket by that much.
  b = int(min(max(b, lo + tol), hi - tol)) // unit * unit
  return b if lo < b < hi else None


def fit_report(r: dict, args, overrides) -> str:
  lines = [f'{r["compiles"]} compiles:']
  for t in r['tried']:
    knob = ', '.join(f'{k}={v}' for k, v in t.items() if '.' in k)
    size = f'{_size(t["total"])} of {_size(t["hbm"])}' if t['total'] else 'out of memory'
    lines.append(f'  {knob:<28} {"fits" if t["fits"] else "does not fit":<13} {size}')
  key = 'train.batch_size' if r['what'] == 'batch' else 'model.remat'
  if r['best'] is None:
    lines.append(
      f'nothing tried fits: set model.remat=full, raise mesh.fsdp, or lower model.max_len'
      if r['what'] == 'batch'
      else 'no remat policy fits this batch: lower train.batch_size (--fit finds the largest)'
    )
    return '\n'.join(lines)
  flags = [f'--config={args.config}', *(f'--config.{o}' for o in overrides if not o.startswith(key + '='))]
  flags += [f'--config.{key}={r["best"]}']
  if args.topology:
    flags += [f'--topology={args.topology}'] + ([f'--slices={args.slices}'] if args.slices > 1 else [])
  lines += [f'fits: {key}={r["best"]}', '  lmjax plan ' + ' '.join(flags)]
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------- counting, report


def count_by_component(params, n_layers: int) -> dict:
  """{'embeddings' | 'attention' | 'mlp' | 'norms': {'per_layer': n, 'total': n}}; per_layer counts only what
  sits inside the blocks. Scanned layers (`blocks/...`, leading layer axis) count the same as `block_{i}/...`."""
  import jax

  in_blocks = dict.fromkeys(('embeddings', 'attention', 'mlp', 'norms'), 0)
  total = dict(in_blocks)
  for keys, x in jax.tree_util.tree_leaves_with_path(params):
    path = [str(getattr(k, 'key', k)) for k in keys]
    if path[0].startswith('block'):
      part = _BLOCK_PARTS[next(p for p in path[1:] if p in _BLOCK_PARTS)]
      in_blocks[part] += x.size
    else:
      part = _TOP_PARTS[path[0]]
    total[part] += x.size
  return {part: {'per_layer': in_blocks[part] // n_layers, 'total': total[part]} for part in total}


def device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (every device holds an equal shard)."""
  import jax

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def _size(n) -> str:
  if n is None:
    return 'n/a'
  for unit, scale in (('GiB', 1 << 30), ('MiB', 1 << 20), ('KiB', 1 << 10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n} B'


def report(p: dict, notes=()) -> str:
  mesh = ' x '.join(f'{k} {v}' for k, v in p['mesh'].items())
  slices = f' over {p["slices"]} slices' if p['slices'] > 1 else ''
  lines = [f'note: {n}' for n in notes]
  lines += [f'mesh: {mesh} = {p["n_devices"]} x {p["device_kind"]}{slices}', '']
  lines.append(f'{"parameters":<14}{"per layer":>14}{"total":>16}')
  for part, c in p['params'].items():
    per_layer = f'{c["per_layer"]:,}' if c['per_layer'] else '-'
    lines.append(f'  {part:<12}{per_layer:>14}{c["total"]:>16,}')
  lines.append(f'  {"total":<12}{"":>14}{p["n_params"]:>16,}')
  fpt = p['flops_per_token']
  lines += [
    '',
    f'training FLOPs: {fpt / 1e6:,.2f} MFLOPs per token (6N + 12 x layers x d_model x length), '
    f'{fpt * p["tokens_per_step"] / 1e12:,.4f} TFLOPs per step of {p["tokens_per_step"]:,} tokens',
    '',
  ]
  return '\n'.join(lines + _memory_lines(p) + _estimate_lines(p))


def _memory_lines(p: dict) -> list[str]:
  b, s = p['bytes_per_device'], p['train_step']
  hbm = p['hbm_bytes']
  if not s['fits'] and 'total' not in s:
    return [
      f'the train step does not fit: {s["oom"]}',
      '  `--fit` finds the largest batch that fits; model.remat=full or a larger mesh.fsdp also lower it',
      f'(compiled in {s["compile_s"]:.1f}s)',
    ]
  lines = [
    f'memory per device (from the compiled train step, batch {p["batch_size"]}, remat {p["remat"]}):',
    f'  params            {_size(b["params"]):>12}',
    f'  optimizer state   {_size(b["optimizer"]):>12}',
    f'  arguments         {_size(s["arguments"]):>12}   (state and batch)',
    f'  outputs           {_size(s["outputs"]):>12}   ({_size(s["aliased"])} of them donated arguments)',
    f'  activations/temps {_size(s["temporaries"]):>12}   (XLA temporaries of one train step)',
    f'  step total        {_size(s["total"]):>12}   (arguments + outputs not donated + temporaries)',
  ]
  if hbm:
    verdict = 'fits' if s['fits'] else 'does NOT fit'
    lines.append(f'  HBM               {_size(hbm):>12}   {verdict}, margin {_size(abs(hbm - s["total"]))}')
  if p.get('eval_step', {}).get('total'):
    lines.append(f'  eval step total   {_size(p["eval_step"]["total"]):>12}')
  sampler = p.get('sample_step', {})
  if sampler.get('total'):
    lines.append(f'  sampler total     {_size(sampler["total"]):>12}   (lmjax sample with sample.*, a full context)')
  elif sampler:
    lines.append(f'  sampler           does not fit: {sampler["oom"]}')
  lines.append(f'(compiled in {p["compile_s"]:.1f}s)')
  return lines


def _estimate_lines(p: dict) -> list[str]:
  lines = []
  if p['attention']:
    calls = p['train_step']['mosaic_calls']
    held = f' ({calls} Mosaic kernel calls in the train step)' if calls else ''
    lines.append(f'attention: {p["attention"]}{held}; model.attention={p["attention_config"]!r}')
  e = p.get('estimate')
  if e and e['step_s'] is None:
    lines.append(
      f"compiler's estimate: none usable (XLA's cost analysis gave optimal_seconds={e['optimal_seconds']:.3g}"
      f' with {e["uncosted_calls"]} uncosted calls added back: some other op it cannot cost)'
    )
  elif e:
    mfu = f', MFU {100 * e["mfu"]:.1f}%' if e['mfu'] is not None else ''
    lines += [
      f"compiler's estimate (XLA's cost model, not a measurement): {1e3 * e['step_s']:.3g} ms per step, "
      f'{e["tokens_per_s"]:,.0f} tokens/s{mfu}',
      f'  from {e["from"]}; it counted {100 * e["flops_counted"]:.0f}% of the model FLOPs'
      + (
        f' ({e["uncosted_calls"]} calls it cannot cost, -1 s each in its sum, added back)'
        if e['uncosted_calls']
        else ''
      ),
    ]
    if e['mfu'] is not None and e['mfu'] > 1:
      lines.append(
        "  NOT CREDIBLE: faster than the chips' peak FLOP/s allow for the model FLOPs; the cost model under-costs"
        ' this program (docs/tpu.md)'
      )
  return lines
