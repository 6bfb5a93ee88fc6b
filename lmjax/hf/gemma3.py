"""Gemma 3, text only (transformers' Gemma3ForCausalLM, model_type gemma3_text): a Gemma 2 (lmjax/hf/gemma2.py)
with QK-norm scaling by (1 + w) as its other norms do, every sixth layer global by default, and the windowed
layers' own RoPE base (model.rope_local_theta). Its vision-language model, Gemma3ForConditionalGeneration, is
refused by the family table. transformers' Gemma 3 ignores attn_logit_softcapping: a config setting it is refused
rather than imported with a cap lmjax would apply.
"""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import gemma2, layout, llama
from lmjax.hf.hfconfig import HFConfig

NAME = 'Gemma3'
ARCHITECTURE = 'Gemma3ForCausalLM'
MODEL_TYPE = 'gemma3_text'
IS = 'a Gemma2 with qk_norm and no attn_softcap'
IGNORED = llama.IGNORED
_DECIDES = {**gemma2.DECIDES, 'qk_norm': (True,), 'attn_softcap': (0.0,), 'rope_local_theta': layout.ANY}
_KINDS = ('sliding_attention', 'full_attention')


def rope_thetas(c: HFConfig) -> dict:
  """rope_theta (global layers) and rope_local_theta (windowed ones), from rope_parameters keyed by layer type
  (transformers 5) or rope_theta and rope_local_base_freq (4.x); only plain RoPE in either."""
  by_type = c.object('rope_parameters')
  if by_type is not None and 'rope_type' in by_type:  # one set for both kinds of layer
    by_type = HFConfig({k: by_type.settings for k in _KINDS}, by_type.where)
  thetas = {'full_attention': c.float('rope_theta', 1e6), 'sliding_attention': c.float('rope_local_base_freq', 1e4)}
  scaling = c.object('rope_scaling')
  if scaling is not None and scaling.get('rope_type', scaling.get('type', 'default')) != 'default':
    raise InteropError(f'rope scaling {scaling.get("rope_type", scaling.get("type"))!r} is not supported for Gemma 3')
  for kind in _KINDS:
    params = by_type.object(kind) if by_type is not None else None
    if params is None:
      continue
    rope_type = params.get('rope_type', 'default')
    if rope_type != 'default':
      raise InteropError(f'rope scaling {rope_type!r} of the {kind} layers is not supported; lmjax has plain RoPE')
    thetas[kind] = params.float('rope_theta', thetas[kind])
  return {'rope_theta': thetas['full_attention'], 'rope_local_theta': thetas['sliding_attention']}


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a Gemma 3 text config.json (InteropError naming what lmjax cannot express)."""
  if c.get('attn_logit_softcapping') is not None:
    raise InteropError(
      f'this Gemma 3 config sets attn_logit_softcapping={c.get("attn_logit_softcapping")}, which transformers '
      "ignores in Gemma 3; set it to null (lmjax would apply it, and the logits would differ from transformers')"
    )
  fields = {**gemma2.gemma_fields(c, every_default=6), 'qk_norm': True, **rope_thetas(c)}
  if fields['rope_local_theta'] == fields['rope_theta']:
    fields['rope_local_theta'] = 0.0
  return fields


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Gemma 3 (empty when it is one)."""
  return layout.mismatches(cfg, _DECIDES)


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  local = cfg.rope_local_theta or cfg.rope_theta
  return {
    **gemma2.gemma_config(cfg, ARCHITECTURE, MODEL_TYPE),
    'attn_logit_softcapping': None,
    'rope_parameters': {
      'full_attention': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'sliding_attention': {'rope_type': 'default', 'rope_theta': local},
    },
    'rope_theta': cfg.rope_theta,  # transformers 4.x's keys
    'rope_local_base_freq': local,
  }


def rename(names: set) -> dict:
  return {}


expected, to_params, from_params = layout.expected, layout.to_params, layout.from_params
