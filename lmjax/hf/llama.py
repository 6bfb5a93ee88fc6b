"""Llama (transformers' LlamaForCausalLM): its config.json, its tensors, and how they map to lmjax's parameters.

A Llama is RMSNorm, rotary positions (plain, or Llama 3.1's rescaled frequencies), a SwiGLU MLP, grouped-query
attention and no biases. torch's Linear weights are stored out x in, so each is transposed into lmjax's in x out
kernels. HF's Llama rotates the two halves of each head (rotate_half), as lmjax's rope does: no permutation of q
or k is needed. D model width, H heads, N kv heads, K head dim, F feed-forward, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
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
  # no QK-norm and no soft-caps (model.qk_norm, attn_softcap, final_softcap)
  'qk_norm': (False,),
  'attn_softcap': (0.0,),
  'final_softcap': (0.0,),
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
  d, heads = c.int('hidden_size'), c.int('num_attention_heads')
  if c.get('head_dim') not in (None, d // heads):
    unsupported.append(f'head_dim={c.get("head_dim")} (lmjax uses hidden_size / num_attention_heads = {d // heads})')
  if unsupported:
    raise InteropError(f'this Llama config sets {", ".join(unsupported)}, which lmjax does not implement')
  return dict(
    vocab_size=c.int('vocab_size'),
    max_len=c.int('max_position_embeddings'),
    n_layers=c.int('num_hidden_layers'),
    n_heads=heads,
    n_kv_heads=c.int('num_key_value_heads', heads),
    d_model=d,
    d_ff=c.int('intermediate_size'),
    norm='rmsnorm',
    norm_eps=c.float('rms_norm_eps', 1e-6),
    positions='rope',
    mlp='swiglu',
    tied_embeddings=c.bool('tie_word_embeddings', False),
    use_bias=False,
    **rope_fields(c),
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a Llama (empty when it is one)."""
  return [f'model.{k}={getattr(cfg, k)!r}' for k, ok in _DECIDES.items() if getattr(cfg, k) not in ok]


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling == 'llama3':
    rope.update(
      rope_type='llama3',
      factor=cfg.rope_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  return {
    'architectures': [ARCHITECTURE],
    'model_type': MODEL_TYPE,
    'vocab_size': cfg.vocab_size,
    'max_position_embeddings': cfg.max_len,
    'hidden_size': cfg.d_model,
    'intermediate_size': cfg.ff_dim,
    'num_hidden_layers': cfg.n_layers,
    'num_attention_heads': cfg.n_heads,
    'num_key_value_heads': cfg.kv_heads,
    'head_dim': cfg.head_dim,
    'hidden_act': 'silu',
    'rms_norm_eps': cfg.norm_eps,
    'tie_word_embeddings': cfg.tied_embeddings,
    'attention_bias': False,
    'mlp_bias': False,
    # both layouts: transformers 4.x reads rope_theta / rope_scaling, 5.x rope_parameters
    'rope_theta': cfg.rope_theta,
    'rope_scaling': rope if cfg.rope_scaling == 'llama3' else None,
    'rope_parameters': rope,
    'torch_dtype': 'float32',
  }


def rename(names: set) -> dict:
  """{name in the files: name used here}: Llama's files use the model class's names."""
  return {}


def expected(cfg: ModelConfig) -> dict:
  """{tensor name: shape} of a Llama of this config."""
  D, F, V, H, N, K = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  out = {'model.embed_tokens.weight': (V, D)}
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    for name, shape in (
      ('input_layernorm.weight', (D,)),
      ('self_attn.q_proj.weight', (H * K, D)),
      ('self_attn.k_proj.weight', (N * K, D)),
      ('self_attn.v_proj.weight', (N * K, D)),
      ('self_attn.o_proj.weight', (D, H * K)),
      ('post_attention_layernorm.weight', (D,)),
      ('mlp.gate_proj.weight', (F, D)),
      ('mlp.up_proj.weight', (F, D)),
      ('mlp.down_proj.weight', (D, F)),
    ):
      out[p + name] = shape
  out['model.norm.weight'] = (D,)
  if not cfg.tied_embeddings:
    out['lm_head.weight'] = (V, D)
  return out


def to_params(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
  """lmjax's parameter tree (numpy float32) from the tensors `get(name)` returns."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  T = lambda x: np.ascontiguousarray(x.T)
  params = {'embed': get('model.embed_tokens.weight')}
  for i in range(cfg.n_layers):
    t = lambda name, i=i: get(f'model.layers.{i}.{name}')
    k, v = t('self_attn.k_proj.weight').T.reshape(D, N, K), t('self_attn.v_proj.weight').T.reshape(D, N, K)
    params[f'block_{i}'] = {
      'ln1': {'scale': t('input_layernorm.weight')},
      'ln2': {'scale': t('post_attention_layernorm.weight')},
      'attn': {
        'q_kernel': T(t('self_attn.q_proj.weight')).reshape(D, H, K),
        'kv_kernel': np.stack([k, v], axis=1),
        'o_kernel': T(t('self_attn.o_proj.weight')).reshape(H, K, D),
      },
      'mlp': {
        'gate_kernel': T(t('mlp.gate_proj.weight')),
        'up_kernel': T(t('mlp.up_proj.weight')),
        'down_kernel': T(t('mlp.down_proj.weight')),
      },
    }
  params['ln_f'] = {'scale': get('model.norm.weight')}
  if not cfg.tied_embeddings:
    params['lm_head'] = T(get('lm_head.weight'))
  return params


def from_params(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(tensor name, float32 array) pairs of lmjax parameters: the inverse of to_params."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  yield 'model.embed_tokens.weight', a(params['embed'])
  for i in range(cfg.n_layers):
    p, blk = f'model.layers.{i}.', params[f'block_{i}']
    at, mlp = blk['attn'], blk['mlp']
    kv = np.asarray(at['kv_kernel'])
    yield from (
      (p + 'input_layernorm.weight', a(blk['ln1']['scale'])),
      (p + 'self_attn.q_proj.weight', a(np.asarray(at['q_kernel']).reshape(D, H * K).T)),
      (p + 'self_attn.k_proj.weight', a(kv[:, 0].reshape(D, N * K).T)),
      (p + 'self_attn.v_proj.weight', a(kv[:, 1].reshape(D, N * K).T)),
      (p + 'self_attn.o_proj.weight', a(np.asarray(at['o_kernel']).reshape(H * K, D).T)),
      (p + 'post_attention_layernorm.weight', a(blk['ln2']['scale'])),
      (p + 'mlp.gate_proj.weight', a(np.asarray(mlp['gate_kernel']).T)),
      (p + 'mlp.up_proj.weight', a(np.asarray(mlp['up_kernel']).T)),
      (p + 'mlp.down_proj.weight', a(np.asarray(mlp['down_kernel']).T)),
    )
  yield 'model.norm.weight', a(params['ln_f']['scale'])
  if not cfg.tied_embeddings:
    yield 'lm_head.weight', a(np.asarray(params['lm_head']).T)
