"""Qwen2 (transformers' Qwen2ForCausalLM): a Llama with biases on the q, k and v projections (model.qkv_bias).

Its tensors are lmjax/hf/layout.py's, with self_attn.{q,k,v}_proj.bias. Qwen2's optional sliding window covers
the layers from max_window_layers on, a pattern lmjax's global_every cannot express: refused.
"""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import layout, llama
from lmjax.hf.hfconfig import HFConfig

NAME = 'Qwen2'
ARCHITECTURE = 'Qwen2ForCausalLM'
MODEL_TYPE = 'qwen2'
IS = 'a Llama with qkv_bias (biases on q, k and v only)'
IGNORED = llama.IGNORED
_DECIDES = {**llama._DECIDES, 'qkv_bias': (True,)}  # pylint: disable=protected-access


def refusals(c: HFConfig) -> list[str]:
  """What a Qwen config may set that lmjax does not implement (Qwen3 shares these)."""
  out = []
  if c.get('hidden_act', 'silu') != 'silu':
    out.append(f'hidden_act={c.get("hidden_act")!r} (lmjax has silu, as SwiGLU)')
  if c.get('use_sliding_window'):
    out.append('use_sliding_window=true (windowed layers from max_window_layers on)')
  types = c.get('layer_types')
  if isinstance(types, list) and any(t != 'full_attention' for t in types):
    out.append(f'layer_types with {sorted(set(types) - {"full_attention"})}')
  return out


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a Qwen2 config.json (InteropError naming what lmjax cannot express)."""
  unsupported = refusals(c)
  if unsupported:
    raise InteropError(f'this {NAME} config sets {", ".join(unsupported)}, which lmjax does not implement')
  return dict(
    **layout.decoder_fields(c),
    mlp='swiglu',
    qkv_bias=True,
    tied_embeddings=c.bool('tie_word_embeddings', False),
    **llama.rope_fields(c),
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Qwen2 (empty when it is one)."""
  return layout.mismatches(cfg, _DECIDES)


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  return {
    **layout.decoder_config(cfg, ARCHITECTURE, MODEL_TYPE),
    'hidden_act': 'silu',
    'use_sliding_window': False,
    **llama.rope_config(cfg),
  }


def rename(names: set) -> dict:
  return {}


expected, to_params, from_params = layout.expected, layout.to_params, layout.from_params
