"""LoRA adapters as PEFT writes and reads them: adapter_config.json + adapter_model.safetensors.

PEFT's tensors are `base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r) for every
adapted module, and the model runs W + (lora_alpha / r) * B A there, whatever the module's storage (GPT-2's
Conv1D, in x out, is `fan_in_fan_out`). lmjax's adapters are A (in x r) and B (r x out) per target
(lmjax/lora.py): the same matrices transposed. Each family module says where its targets live (LORA_LAYER,
LORA_MODULES: {target: (module, place)}).

A module holding several targets (GPT-2's c_attn: q | k | v) gets one PEFT adapter of rank n * r, block-diagonal:
A stacks the targets' A, B puts each target's B on its own rows and columns; `rank_pattern` and `alpha_pattern`
keep its scale alpha / r. Reading goes the other way for any adapter, block-diagonal or not: each target of a
module gets the module's whole A, and its rows of B; ranks differing between modules are padded with zeros to the
largest, and each module's scale is folded into its B, so lmjax runs the same weights at lora.alpha = lora.rank.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from lmjax import lora as lora_lib
from lmjax.config import LORA_TARGETS, ModelConfig
from lmjax.errors import InteropError

CONFIG, WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
PREFIX = 'base_model.model.'


def _modules(family, targets) -> dict:
  """{module: [target, ...] in their order inside it} for the targets given."""
  out = {}
  for t in sorted(targets, key=lambda t: family.LORA_MODULES[t][1]):
    out.setdefault(family.LORA_MODULES[t][0], []).append(t)
  return out


def _offsets(family, cfg: ModelConfig, module: str) -> dict:
  """{target: first output row} of every target a module holds (PEFT's B rows)."""
  parts = sorted((p, t) for t, (m, p) in family.LORA_MODULES.items() if m == module)
  out, at = {}, 0
  for _, t in parts:
    out[t] = at
    at += lora_lib.io_dims(cfg, t)[1]
  return out


def check_family(family, targets) -> None:
  missing = [t for t in targets if t not in family.LORA_MODULES]
  if missing:
    raise InteropError(f'{family.NAME} has no module for the LoRA target(s) {", ".join(missing)}')


def write_adapter(out: str, adapters, cfg: ModelConfig, lora_section, family, base_ref: str) -> dict:
  """Writes host `adapters` (lmjax/lora.py layout) as a PEFT adapter directory. Returns a summary."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  targets, r, alpha = tuple(lora_section['targets']), int(lora_section['rank']), float(lora_section['alpha'])
  check_family(family, targets)
  modules = _modules(family, targets)
  tensors = {}
  for i in range(cfg.n_layers):
    layer = adapters[f'block_{i}']
    for module, parts in modules.items():
      name = PREFIX + family.LORA_LAYER.format(i=i) + module
      offsets = _offsets(family, cfg, module)
      d_in = lora_lib.io_dims(cfg, parts[0])[0]
      d_out = sum(lora_lib.io_dims(cfg, t)[1] for t in offsets)
      a_RxI = np.zeros((len(parts) * r, d_in), np.float32)
      b_OxR = np.zeros((d_out, len(parts) * r), np.float32)
      for j, t in enumerate(parts):
        a, b = np.asarray(layer[t]['a'], np.float32), np.asarray(layer[t]['b'], np.float32)
        a_RxI[j * r : (j + 1) * r] = a.T
        b_OxR[offsets[t] : offsets[t] + b.shape[1], j * r : (j + 1) * r] = b.T
      tensors[f'{name}.lora_A.weight'] = np.ascontiguousarray(a_RxI)
      tensors[f'{name}.lora_B.weight'] = np.ascontiguousarray(b_OxR)
  fused = {m: len(p) for m, p in modules.items() if len(p) > 1}
  config = {
    'peft_type': 'LORA',
    'task_type': 'CAUSAL_LM',
    'base_model_name_or_path': base_ref,
    'r': r,
    'lora_alpha': alpha,
    'lora_dropout': float(lora_section['dropout']),
    'target_modules': sorted(modules),
    'rank_pattern': {m: n * r for m, n in fused.items()},
    'alpha_pattern': {m: n * alpha for m, n in fused.items()},
    'fan_in_fan_out': family.FAN_IN_FAN_OUT,
    'bias': 'none',
    'use_rslora': False,
    'use_dora': False,
    'init_lora_weights': True,
    'inference_mode': True,
    'modules_to_save': None,
  }
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(out, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  return {'out': out, 'peft': True, 'targets': list(targets), 'rank': r, 'adapter_parameters': lora_lib.count(adapters)}


def _pattern(patterns: dict, module_path: str, default):
  """PEFT's rule: the first key of rank_pattern / alpha_pattern that matches the end of the module's path."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?{key}$', module_path):
      return value
  return default


def read_adapter(directory: str, cfg: ModelConfig, family) -> tuple[dict, dict]:
  """(the lora section {rank, alpha, dropout, targets}, adapters in lmjax's layout, numpy) of a PEFT adapter
  directory, for a base of this config and family. Refused (InteropError naming it): not LoRA, DoRA, a module
  lmjax has no target for, a tensor of the wrong shape."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  where = os.path.join(directory, CONFIG)
  try:
    with open(where, encoding='utf-8') as f:
      ac = json.load(f)
  except FileNotFoundError:
    raise InteropError(
      f'--adapter {directory} holds no {CONFIG}; give a directory PEFT save_pretrained wrote'
    ) from None
  except (OSError, ValueError) as e:
    raise InteropError(f'{where} cannot be read as JSON ({e})') from None
  if not isinstance(ac, dict) or ac.get('peft_type', 'LORA') != 'LORA':
    raise InteropError(f'{where}: peft_type {ac.get("peft_type")!r} is not supported; lmjax imports LoRA adapters')
  for key in ('use_dora', 'use_rslora'):
    if ac.get(key):
      raise InteropError(f'{where} sets {key}=true, which lmjax does not implement')
  if ac.get('modules_to_save'):
    raise InteropError(
      f'{where} trains whole modules too (modules_to_save={ac["modules_to_save"]}); lmjax imports adapters only'
    )
  r0, alpha0 = ac.get('r'), ac.get('lora_alpha', ac.get('r'))
  if not isinstance(r0, int) or r0 <= 0:
    raise InteropError(f'{where}: r must be an integer > 0, got {r0!r}')
  path = os.path.join(directory, WEIGHTS)
  if not os.path.exists(path):
    raise InteropError(f'--adapter {directory} holds no {WEIGHTS}')
  tensors = load_file(path)
  inverse = {}
  for t, (module, _) in family.LORA_MODULES.items():
    inverse.setdefault(module, []).append(t)
  layer = re.escape(family.LORA_LAYER).replace(re.escape('{i}'), r'(\d+)')
  found = {}  # (layer, module) -> (A, B, scale)
  for name in tensors:
    m = re.fullmatch(rf'{re.escape(PREFIX)}{layer}(.+)\.lora_([AB])(?:\.default)?\.weight', name)
    if m is None or m.group(2) not in inverse or int(m.group(1)) >= cfg.n_layers:
      raise InteropError(f'{path}: tensor {name} is not a LoRA weight of a {family.NAME} module lmjax adapts')
    found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensors[name].astype(np.float32)
  if not found:
    raise InteropError(f'{path} holds no LoRA weights')
  rank = max(p['A'].shape[0] for p in found.values() if 'A' in p)
  targets = sorted({t for _, module in found for t in inverse[module]}, key=LORA_TARGETS.index)
  adapters = {f'block_{i}': {} for i in range(cfg.n_layers)}
  for i in range(cfg.n_layers):
    for t in targets:
      d_in, d_out = lora_lib.io_dims(cfg, t)
      adapters[f'block_{i}'][t] = {'a': np.zeros((d_in, rank), np.float32), 'b': np.zeros((rank, d_out), np.float32)}
  for (i, module), pair in found.items():
    if set(pair) != {'A', 'B'}:
      raise InteropError(f'{path}: layer {i} {module} has lora_{"A" if "B" in pair else "B"} missing')
    a_RxI, b_OxR = pair['A'], pair['B']
    module_path = family.LORA_LAYER.format(i=i) + module
    R = a_RxI.shape[0]
    offsets = _offsets(family, cfg, module)
    d_in = lora_lib.io_dims(cfg, inverse[module][0])[0]
    d_out = sum(lora_lib.io_dims(cfg, t)[1] for t in offsets)
    if a_RxI.shape != (R, d_in) or b_OxR.shape != (d_out, R):
      raise InteropError(
        f'{path}: {module_path} has lora_A {list(a_RxI.shape)} and lora_B {list(b_OxR.shape)}; this base needs '
        f'[r, {d_in}] and [{d_out}, r]'
      )
    r_m = _pattern(ac.get('rank_pattern'), module_path, r0)
    scale = float(_pattern(ac.get('alpha_pattern'), module_path, alpha0)) / r_m
    for t in inverse[module]:
      if t not in offsets:
        continue
      w = lora_lib.io_dims(cfg, t)[1]
      adapters[f'block_{i}'][t]['a'][:, :R] = a_RxI.T
      adapters[f'block_{i}'][t]['b'][:R] = scale * b_OxR[offsets[t] : offsets[t] + w].T
  section = {'rank': int(rank), 'alpha': float(rank), 'dropout': float(ac.get('lora_dropout', 0.0)), 'targets': targets}
  return section, adapters


def import_adapter(base: str, adapter: str, workdir: str) -> dict:
  """`lmjax import-hf --from=BASE --adapter=DIR`: a PEFT adapter trained elsewhere as a LoRA workdir over the HF
  model BASE (train.init_from=hf:BASE): config.json, the base's tokenizer, and the adapters as a parameters-only
  checkpoint at step 0 that `lmjax sample`, `eval` and `export-hf` read as base + adapters."""
  import jax  # pylint: disable=import-outside-toplevel

  from lmjax import config as config_lib, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from lmjax.hf import convert, families  # pylint: disable=import-outside-toplevel
  from lmjax.hf.source import read, resolve_source  # pylint: disable=import-outside-toplevel

  base = resolve_source(base)
  convert.check_target(workdir, base, adapter)
  fields, arch, tokenizer, params = read(base)
  config = convert.import_config(fields, base)
  cfg = ModelConfig(**config.model.to_dict())
  section, adapters = read_adapter(adapter, cfg, families.FAMILIES[arch])
  with open(os.path.join(adapter, CONFIG), encoding='utf-8') as f:
    named = json.load(f).get('base_model_name_or_path') or ''
  if named and os.path.basename(os.path.normpath(named)) != os.path.basename(os.path.normpath(base)):
    # Hub names and local copies of one model differ in name, so a different name only warns; shapes were checked.
    print(
      f'lmjax import-hf: warning: {adapter} says it was trained over {named!r}, and --from is {base}; the shapes '
      'fit, but make sure it is the same model',
      file=sys.stderr,
    )
  ref = f'hf:{os.path.abspath(base)}'
  with config.unlocked():
    config.lora.update(section)
    config.lora.targets = tuple(section['targets'])
    config.train.init_from = ref
  config_lib.validate(config)
  workdir_lib.ensure_writable(workdir)
  meta = {
    'config': config.to_dict(),
    'tokenizer': tokenizer.spec(),
    'params_only': True,
    'lora_base': lora_lib.fingerprint(ref, params),
    'imported_from': {'source': os.path.abspath(base), 'adapter': os.path.abspath(adapter), 'architecture': arch},
  }
  convert.write_imported(workdir, config, tokenizer, jax.device_put(adapters), meta)
  return {
    'workdir': workdir,
    'architecture': arch,
    'base': base,
    'adapter': adapter,
    'rank': section['rank'],
    'targets': section['targets'],
    'adapter_parameters': lora_lib.count(adapters),
  }
