"""Qwen3 (transformers' Qwen3ForCausalLM): a Llama with QK-norm (model.qk_norm: RMSNorm over each head's q and k,
before RoPE, weights self_attn.{q,k}_norm.weight) and a head_dim of its own. No biases (attention_bias=true, which
adds one to o_proj too, is refused), and the sliding-window settings Qwen2 has are refused as there.
"""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import layout, llama, qwen2
from lmjax.hf.hfconfig import HFConfig

NAME = 'Qwen3'
ARCHITECTURE = 'Qwen3ForCausalLM'
MODEL_TYPE = 'qwen3'
IS = 'a Llama with qk_norm'
IGNORED = llama.IGNORED
_DECIDES = {**llama._DECIDES, 'qk_norm': (True,)}  # pylint: disable=protected-access


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a Qwen3 config.json (InteropError naming what lmjax cannot express)."""
  unsupported = qwen2.refusals(c)
  if c.get('attention_bias'):
    unsupported.append('attention_bias=true (biases on q, k, v and o)')
  if unsupported:
    raise InteropError(f'this {NAME} config sets {", ".join(unsupported)}, which lmjax does not implement')
  return dict(
    **layout.decoder_fields(c),
    mlp='swiglu',
    qk_norm=True,
    tied_embeddings=c.bool('tie_word_embeddings', False),
    **llama.rope_fields(c),
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Qwen3 (empty when it is one)."""
  return layout.mismatches(cfg, _DECIDES)


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  return {
    **layout.decoder_config(cfg, ARCHITECTURE, MODEL_TYPE),
    'hidden_act': 'silu',
    'attention_bias': False,
    'use_sliding_window': False,
    **llama.rope_config(cfg),
  }


def rename(names: set) -> dict:
  return {}


expected, to_params, from_params = layout.expected, layout.to_params, layout.from_params
