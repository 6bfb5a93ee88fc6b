"""The table of model families lmjax converts, and the code that works through it for any family.

Each entry maps a transformers architecture name to the module that knows everything about that family: its
config.json fields, its tensor names and shapes, its norm and rope rules, and the mapping to lmjax's parameters
(lmjax/hf/__init__.py lists what such a module holds). Nothing outside those modules names one family's tensor or
config key; this table is the only place that lists the families.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import gemma2, gemma3, gpt2, llama, mistral, qwen2, qwen3
from lmjax.hf.hfconfig import HFConfig

# Export picks the first family a model fits (a plain Llama-shaped model is a Llama, not a Mistral without a window).
FAMILIES = {
  'GPT2LMHeadModel': gpt2,
  'LlamaForCausalLM': llama,
  'Qwen2ForCausalLM': qwen2,
  'Qwen3ForCausalLM': qwen3,
  'MistralForCausalLM': mistral,
  'Gemma2ForCausalLM': gemma2,
  'Gemma3ForCausalLM': gemma3,
}
# Architectures people will try, and what in them lmjax lacks (the refusal names it).
_LACKS = {
  'Gemma3ForConditionalGeneration': 'a vision tower (lmjax imports the text model, Gemma3ForCausalLM)',
  'Qwen2MoeForCausalLM': 'mixture-of-experts layers',
  'Qwen3MoeForCausalLM': 'mixture-of-experts layers',
  'MixtralForCausalLM': 'mixture-of-experts layers',
  'Qwen2VLForConditionalGeneration': 'a vision tower',
  'Qwen2_5_VLForConditionalGeneration': 'a vision tower',
}
ARCHITECTURES = tuple(FAMILIES)


def _listed(names) -> str:
  names = list(names)
  return ' and '.join(names) if len(names) < 3 else ', '.join(names[:-1]) + ' and ' + names[-1]


def of_hf_config(c: HFConfig):
  """The family module of a config.json: its `architectures`, else (when it names none) its `model_type`."""
  archs = c.get('architectures') or []
  archs = [archs] if isinstance(archs, str) else archs
  if not isinstance(archs, list):
    raise InteropError(f'{c.where} has architectures={archs!r}; expected a list of class names')
  known = [a for a in archs if isinstance(a, str) and a in FAMILIES]
  if known:
    return FAMILIES[known[0]]
  model_type = c.get('model_type')
  by_type = {f.MODEL_TYPE: f for f in FAMILIES.values()}
  if not archs and isinstance(model_type, str) and model_type in by_type:
    return by_type[model_type]
  named = ', '.join(str(a) for a in archs) or str(c.get('model_type', '?'))
  lacks = [f'{a} has {_LACKS[a]}' for a in archs if a in _LACKS]
  why = f' ({"; ".join(lacks)}, which lmjax does not implement)' if lacks else ''
  raise InteropError(f'architecture {named} is not supported{why}; lmjax imports {_listed(FAMILIES)}')


def of_model(cfg: ModelConfig):
  """The family module an lmjax model belongs to, or an InteropError naming what each family would need changed."""
  for family in FAMILIES.values():
    if not family.mismatches(cfg):
      return family
  needs = '; '.join(f'{f.NAME} needs {", ".join(f.mismatches(cfg))} changed' for f in FAMILIES.values())
  shapes = '; '.join(f'a {f.NAME} is {f.IS}' for f in FAMILIES.values())
  raise InteropError(f'this model has no Hugging Face class: {needs} ({shapes})')


def architecture(hf: dict) -> str:
  return of_hf_config(HFConfig(hf)).ARCHITECTURE


def model_fields(hf: dict, where: str = 'config.json') -> dict:
  """The ModelConfig fields of an HF config (InteropError naming what lmjax cannot express)."""
  c = HFConfig(hf, where)
  return of_hf_config(c).model_fields(c)


def hf_config(cfg: ModelConfig, tokenizer=None) -> dict:
  """The transformers config.json of an lmjax model; InteropError naming the fields HF's classes cannot express."""
  ids = {
    'bos_token_id': getattr(tokenizer, 'bos_id', None),
    'eos_token_id': getattr(tokenizer, 'eos_id', None),
    'pad_token_id': getattr(tokenizer, 'pad_id', None),
  }
  return {**of_model(cfg).hf_config(cfg), **ids}


def check_tensors(tensors, cfg: ModelConfig, family, where: str) -> None:
  """An InteropError naming every tensor that is missing, extra or of the wrong shape for this config."""
  want, have = family.expected(cfg), tensors.names()
  arch = family.ARCHITECTURE
  extra = sorted(n for n in have - set(want) if not n.endswith(family.IGNORED))
  problems = [f'{n} is missing (expected shape {list(want[n])})' for n in sorted(set(want) - have)]
  problems += [f'{n} is not a tensor of {arch} as configured (shape {list(tensors.shape(n))})' for n in extra]
  problems += [
    f'{n} has shape {list(tensors.shape(n))}, expected {list(want[n])}'
    for n in sorted(set(want) & have)
    if tensors.shape(n) != want[n]
  ]
  if problems:
    shown = '; '.join(problems[:8]) + (f'; and {len(problems) - 8} more' if len(problems) > 8 else '')
    raise InteropError(f'the weights in {where} do not match its config.json ({arch}): {shown}')


def to_params(tensors, cfg: ModelConfig, arch: str) -> dict:
  """lmjax's parameter tree (numpy float32) from an HF model's tensors (a Tensors, checked by check_tensors)."""
  return FAMILIES[arch].to_params(tensors.get, cfg)


def from_params(params: dict, cfg: ModelConfig, arch: str) -> Iterator[tuple[str, np.ndarray]]:
  """(HF tensor name, numpy array) pairs of lmjax parameters: the inverse of to_params."""
  return FAMILIES[arch].from_params(params, cfg)
