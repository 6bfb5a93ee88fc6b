"""`lmjax plan`: what a config costs before you train it -- parameters, FLOPs per token, memory per device.

Needs no dataset and runs nothing: parameter shapes come from `jax.eval_shape`, FLOPs from the one formula
(lmjax.model.flops_per_token), and memory from XLA's own analysis of the compiled train step on the configured
mesh. `--devices=8` simulates 8 CPU devices, so an 8-way FSDP or tensor-parallel mesh can be checked on a laptop:

  lmjax plan --config=configs/shakespeare_char.py --devices=8 --config.mesh.data=1 --config.mesh.fsdp=8
"""

from __future__ import annotations

import math
import os

# Components of a parameter, by the first path entry below a block that names it (see lmjax/model.py paths).
_BLOCK_PARTS = {'attn': 'attention', 'mlp': 'mlp', 'ln1': 'norms', 'ln2': 'norms'}
_TOP_PARTS = {'embed': 'embeddings', 'pos_embed': 'embeddings', 'lm_head': 'embeddings', 'ln_f': 'norms'}


def run(args, overrides):
  import jax

  if args.devices:  # must precede the first JAX call that starts a backend
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', args.devices)
  from lmjax import config as config_lib

  if os.path.isdir(args.config):  # a workdir: the config its run recorded (an imported model's among them)
    from lmjax import workdir as workdir_lib

    config = workdir_lib.load_config(args.config, overrides)
  else:
    config = config_lib.load(args.config, overrides)
  notes = []
  if config.model.vocab_size == 0:
    with config.unlocked():
      config.model.vocab_size = args.vocab_size
    notes.append(
      f"model.vocab_size is 0 (the tokenizer's size at train time); planned with --vocab_size={args.vocab_size}"
    )
  print(report(plan(config), notes))


def plan(config) -> dict:
  """The numbers `lmjax plan` prints, as a dict (tests and notebooks read it directly)."""
  import jax
  from lmjax import task as task_lib

  task = task_lib.Task(config)
  task_lib.check_training(config, task.mesh)
  cfg = task.model_cfg
  params = task.abstract_state.params
  K, B, L = task.train_batch_shape
  batch_spec = task.train_batch_spec()  # the keys training feeds the step (packed rows add segments, positions)
  compiled, compile_s = task.compile_train(batch_spec)
  mem = compiled.memory_analysis()
  return {
    'mesh': dict(task.mesh.shape),
    'n_devices': task.mesh.size,
    'device_kind': jax.devices()[0].device_kind,
    'params': count_by_component(params, cfg.n_layers),
    'n_params': task.n_params,
    'flops_per_token': task.flops_per_token,
    'tokens_per_step': B * L,
    'batch_keys': sorted(batch_spec),
    'bytes_per_device': {
      'params': device_bytes(params),
      'optimizer': device_bytes(task.abstract_state.opt_state),
      'arguments': getattr(mem, 'argument_size_in_bytes', None),
      'outputs': getattr(mem, 'output_size_in_bytes', None),
      'aliased': getattr(mem, 'alias_size_in_bytes', None),
      'temporaries': getattr(mem, 'temp_size_in_bytes', None),
      'step_total': task_lib.step_bytes_per_device(mem),
    },
    'compile_s': compile_s,
  }


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
  lines = [f'note: {n}' for n in notes]
  lines += [
    f'mesh: {mesh} = {p["n_devices"]} x {p["device_kind"]}',
    '',
    f'{"parameters":<14}{"per layer":>14}{"total":>16}',
  ]
  for part, c in p['params'].items():
    per_layer = f'{c["per_layer"]:,}' if c['per_layer'] else '-'
    lines.append(f'  {part:<12}{per_layer:>14}{c["total"]:>16,}')
  lines.append(f'  {"total":<12}{"":>14}{p["n_params"]:>16,}')
  fpt = p['flops_per_token']
  lines += [
    '',
    f'training FLOPs: {fpt / 1e6:,.2f} MFLOPs per token (6N + 12 x layers x d_model x length), '
    f'{fpt * p["tokens_per_step"] / 1e12:,.4f} TFLOPs per step of {p["tokens_per_step"]:,} tokens',
  ]
  b = p['bytes_per_device']
  lines += [
    '',
    'memory per device (from the compiled train step):',
    f'  params            {_size(b["params"]):>12}',
    f'  optimizer state   {_size(b["optimizer"]):>12}',
    f'  activations/temps {_size(b["temporaries"]):>12}   (XLA temporaries of one train step)',
    f'  step total        {_size(b["step_total"]):>12}   (arguments + outputs not donated + temporaries)',
    f'(compiled in {p["compile_s"]:.1f}s)',
  ]
  return '\n'.join(lines)
