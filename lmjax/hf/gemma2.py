"""Gemma 2 (transformers' Gemma2ForCausalLM): its config.json, and the Gemma rules Gemma 3 shares.

A Gemma is a Llama-style decoder with: RMSNorm scaling by (1 + w) (model.norm_offset), embeddings times
sqrt(d_model) (embed_scale), a norm after attention and after the MLP too (post_norms; HF's four norms per layer,
lmjax/hf/layout.py), a tanh-GELU gated MLP (geglu), scores scaled by 1/sqrt(query_pre_attn_scalar), soft-caps of
the attention scores and the final logits, and layers that alternate between a sliding window and global
attention (HF's layer_types; lmjax's attn_window with global_every: Gemma 2 makes every second layer global).
"""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import layout, llama
from lmjax.hf.hfconfig import HFConfig

NAME = 'Gemma2'
ARCHITECTURE = 'Gemma2ForCausalLM'
MODEL_TYPE = 'gemma2'
IS = 'rmsnorm with norm_offset + embed_scale + post_norms + geglu + rope, no biases or qk_norm'
IGNORED = llama.IGNORED
DECIDES = {
  'norm': ('rmsnorm',),
  'positions': ('rope',),
  'use_bias': (False,),
  'mlp': ('geglu',),
  'norm_offset': (True,),
  'embed_scale': (True,),
  'post_norms': (True,),
  'query_pre_attn_scalar': layout.Where(lambda v: float(v).is_integer()),  # HF's is an int
  'attn_window': layout.ANY,
  'global_every': layout.ANY,
  'attn_softcap': layout.ANY,
  'final_softcap': layout.ANY,
}
_SLIDING, _FULL = 'sliding_attention', 'full_attention'


def refusals(c: HFConfig) -> list[str]:
  """What a Gemma 2 or 3 config may set that lmjax does not implement."""
  out = []
  if c.get('hidden_activation', 'gelu_pytorch_tanh') not in ('gelu_pytorch_tanh', 'gelu_tanh'):
    out.append(f'hidden_activation={c.get("hidden_activation")!r} (lmjax has gelu_pytorch_tanh, as GeGLU)')
  for key in ('attention_bias', 'use_bidirectional_attention'):
    if c.get(key):
      out.append(f'{key}=true')
  return out


def window_fields(c: HFConfig, every_default: int) -> dict:
  """attn_window and global_every from layer_types (or, in older files, sliding_window_pattern: every Nth layer
  global); an InteropError when the layers follow no every-Nth-layer-global pattern."""
  n = c.int('num_hidden_layers')
  types = c.get('layer_types')
  if types is None:
    every = c.int('sliding_window_pattern', every_default)
    types = [_FULL if (i + 1) % every == 0 else _SLIDING for i in range(n)]
  if not isinstance(types, list) or len(types) != n or set(types) - {_SLIDING, _FULL}:
    raise InteropError(f'{c.where} has layer_types={types!r}; expected {n} of {_SLIDING!r} and {_FULL!r}')
  if _SLIDING not in types:
    return {'attn_window': 0, 'global_every': 0}
  window = c.int('sliding_window')
  if _FULL not in types:
    return {'attn_window': window, 'global_every': 0}
  every = types.index(_FULL) + 1
  if types != [_FULL if (i + 1) % every == 0 else _SLIDING for i in range(n)]:
    raise InteropError(
      f'{c.where} has layer_types {types}; lmjax needs every Nth layer global and the rest windowed '
      '(model.global_every)'
    )
  return {'attn_window': window, 'global_every': every}


def layer_types(cfg: ModelConfig) -> list[str]:
  return [_SLIDING if cfg.is_local(i) else _FULL for i in range(cfg.n_layers)]


def gemma_fields(c: HFConfig, every_default: int) -> dict:
  """The fields Gemma 2 and 3 read alike (refusals first)."""
  unsupported = refusals(c)
  if unsupported:
    name = 'Gemma 3' if c.get('model_type') == 'gemma3_text' else 'Gemma 2'
    raise InteropError(f'this {name} config sets {", ".join(unsupported)}, which lmjax does not implement')
  fields = layout.decoder_fields(c)
  head = fields['head_dim'] or fields['d_model'] // fields['n_heads']
  scalar = c.float('query_pre_attn_scalar', 256.0)
  return dict(
    **fields,
    norm_offset=True,
    embed_scale=True,
    post_norms=True,
    mlp='geglu',
    tied_embeddings=c.bool('tie_word_embeddings', True),
    query_pre_attn_scalar=0.0 if scalar == head else scalar,
    final_softcap=c.float('final_logit_softcapping', 0.0),
    **window_fields(c, every_default),
  )


def gemma_config(cfg: ModelConfig, architecture: str, model_type: str) -> dict:
  return {
    **layout.decoder_config(cfg, architecture, model_type),
    'hidden_activation': 'gelu_pytorch_tanh',
    'attention_bias': False,
    'query_pre_attn_scalar': int(cfg.query_pre_attn_scalar or cfg.head_size),
    'sliding_window': cfg.attn_window or None,
    'layer_types': layer_types(cfg),
    'final_logit_softcapping': cfg.final_softcap or None,
  }


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a Gemma 2 config.json (InteropError naming what lmjax cannot express)."""
  return dict(
    **gemma_fields(c, every_default=2),
    attn_softcap=c.float('attn_logit_softcapping', 0.0),
    **llama.rope_fields(c),
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Gemma 2 (empty when it is one)."""
  return layout.mismatches(cfg, DECIDES)


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  return {
    **gemma_config(cfg, ARCHITECTURE, MODEL_TYPE),
    'attn_logit_softcapping': cfg.attn_softcap or None,
    **llama.rope_config(cfg),
  }


def rename(names: set) -> dict:
  return {}


expected, to_params, from_params = layout.expected, layout.to_params, layout.from_params
