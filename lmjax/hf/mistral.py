"""Mistral (transformers' MistralForCausalLM): a Llama whose every layer attends within a sliding window
(model.attn_window = sliding_window; null = full attention), with a head_dim of its own. Tensors: layout.py's.
"""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import layout, llama
from lmjax.hf.hfconfig import HFConfig

NAME = 'Mistral'
ARCHITECTURE = 'MistralForCausalLM'
MODEL_TYPE = 'mistral'
IS = 'a Llama with attn_window > 0 in every layer (global_every=0)'
IGNORED = llama.IGNORED
_DECIDES = {**llama._DECIDES, 'attn_window': layout.Where(lambda v: v > 0)}  # pylint: disable=protected-access


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a Mistral config.json (InteropError naming what lmjax cannot express)."""
  unsupported = []
  if c.get('hidden_act', 'silu') != 'silu':
    unsupported.append(f'hidden_act={c.get("hidden_act")!r} (lmjax has silu, as SwiGLU)')
  if 'layer_types' in c:  # transformers' Mistral ignores them (it warns): Ministral's alternating layers
    unsupported.append('layer_types (alternating attention, which MistralForCausalLM ignores)')
  if unsupported:
    raise InteropError(f'this {NAME} config sets {", ".join(unsupported)}, which lmjax does not implement')
  return dict(
    **layout.decoder_fields(c),
    mlp='swiglu',
    tied_embeddings=c.bool('tie_word_embeddings', False),
    attn_window=c.int('sliding_window', 0, minimum=0),
    **llama.rope_fields(c),
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Mistral (empty when it is one)."""
  return layout.mismatches(cfg, _DECIDES)


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  return {
    **layout.decoder_config(cfg, ARCHITECTURE, MODEL_TYPE),
    'hidden_act': 'silu',
    'sliding_window': cfg.attn_window,
    **llama.rope_config(cfg),
  }


def rename(names: set) -> dict:
  return {}


expected, to_params, from_params = layout.expected, layout.to_params, layout.from_params
