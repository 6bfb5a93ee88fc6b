"""Llama (transformers' LlamaForCausalLM): its config.json, and its rope rule, which the other rope families share.

A Llama is RMSNorm, rotary positions (plain, or Llama 3.1's rescaled frequencies), a SwiGLU MLP, grouped-query
attention and no biases. Its tensors are lmjax/hf/layout.py's (the layout Qwen, Mistral and Gemma extend).
"""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import layout
from lmjax.hf.hfconfig import HFConfig

NAME = 'Llama'
ARCHITECTURE = 'LlamaForCausalLM'
MODEL_TYPE = 'llama'
IS = 'rmsnorm + rope + swiglu without biases, QK-norm or soft-caps'
# Tensors that may be in the files and hold nothing lmjax needs: cached rotary frequencies older writers saved,
# and the output projection of a tied model (a copy of the embedding).
IGNORED = ('.rotary_emb.inv_freq', 'lm_head.weight')
# LoRA (lmjax/hf/peft.py): each lmjax target's module in a layer (one projection each); torch Linear, out x in.
LORA_LAYER = 'model.layers.{i}.'
LORA_MODULES = {
  'q': ('self_attn.q_proj', 0),
  'k': ('self_attn.k_proj', 0),
  'v': ('self_attn.v_proj', 0),
  'o': ('self_attn.o_proj', 0),
  'gate': ('mlp.gate_proj', 0),
  'up': ('mlp.up_proj', 0),
  'down': ('mlp.down_proj', 0),
}
FAN_IN_FAN_OUT = False
_DECIDES = {
  'norm': ('rmsnorm',),
  'positions': ('rope',),
  'use_bias': (False,),
  'mlp': ('swiglu',),
}


def rope_fields(c: HFConfig) -> dict:
  """theta and scaling from either transformers layout: `rope_parameters` (v5) or rope_theta + rope_scaling (v4).
  Other rope-based families share this rule."""
  params = c.object('rope_parameters') or c.object('rope_scaling')
  theta = c.float('rope_theta', 10000.0)
  if params is None:
    return {'rope_theta': theta}
  kind = params.get('rope_type', params.get('type', 'default'))
  out = {'rope_theta': params.float('rope_theta', theta)}
  if kind == 'llama3':
    out.update(
      rope_scaling='llama3',
      rope_factor=params.float('factor'),
      rope_low_freq_factor=params.float('low_freq_factor'),
      rope_high_freq_factor=params.float('high_freq_factor'),
      rope_original_max_len=params.int('original_max_position_embeddings'),
    )
  elif kind != 'default':
    raise InteropError(f"rope scaling {kind!r} is not supported; lmjax implements plain RoPE and 'llama3'")
  return out


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a Llama config.json (InteropError naming what lmjax cannot express)."""
  unsupported = [f'{k}=True' for k in ('attention_bias', 'mlp_bias') if c.get(k)]
  if c.get('hidden_act', 'silu') != 'silu':
    unsupported.append(f'hidden_act={c.get("hidden_act")!r} (lmjax has silu, as SwiGLU)')
  if c.get('pretraining_tp', 1) not in (1, None):
    unsupported.append(f'pretraining_tp={c.get("pretraining_tp")}')
  if unsupported:
    raise InteropError(f'this Llama config sets {", ".join(unsupported)}, which lmjax does not implement')
  return dict(
    **layout.decoder_fields(c),
    mlp='swiglu',
    tied_embeddings=c.bool('tie_word_embeddings', False),
    **rope_fields(c),
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Llama (empty when it is one)."""
  return layout.mismatches(cfg, _DECIDES)


def rope_config(cfg: ModelConfig) -> dict:
  """rope_theta, rope_scaling and rope_parameters of config.json, in both layouts: transformers 4.x reads
  rope_theta / rope_scaling, 5.x rope_parameters."""
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling == 'llama3':
    rope.update(
      rope_type='llama3',
      factor=cfg.rope_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  scaling = rope if cfg.rope_scaling == 'llama3' else None
  return {'rope_theta': cfg.rope_theta, 'rope_scaling': scaling, 'rope_parameters': rope}


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  return {
    **layout.decoder_config(cfg, ARCHITECTURE, MODEL_TYPE),
    'hidden_act': 'silu',
    'attention_bias': False,
    'mlp_bias': False,
    **rope_config(cfg),
  }


def rename(names: set) -> dict:
  """{name in the files: name used here}: Llama's files use the model class's names."""
  return {}


expected, to_params, from_params = layout.expected, layout.to_params, layout.from_params
