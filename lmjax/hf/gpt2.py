"""GPT-2 (transformers' GPT2LMHeadModel): its config.json, its tensors, and how they map to lmjax's parameters.

A GPT-2 is LayerNorm with biases, learned positions, a GELU MLP (tanh approximation, HF's gelu_new, or exact) and
full multi-head attention. Its linear layers are Conv1D, stored in x out (as lmjax's kernels are, so nothing is
transposed); c_attn holds q|k|v side by side in its columns. D model width, H heads, K head dim, F feed-forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import layout
from lmjax.hf.hfconfig import HFConfig

NAME = 'GPT-2'
ARCHITECTURE = 'GPT2LMHeadModel'
MODEL_TYPE = 'gpt2'
IS = 'layernorm + learned positions + gelu_tanh or gelu + biases, no grouped-query attention, QK-norm or soft-caps'
# Tensors that may be in the files and hold nothing lmjax needs: causal-mask buffers older writers saved, and the
# output projection of a tied model (a copy of the embedding).
IGNORED = ('.attn.bias', '.attn.masked_bias', 'lm_head.weight')
# LoRA (lmjax/hf/peft.py): each lmjax target's module in a layer, and its place in it: c_attn holds q | k | v.
# Conv1D stores in x out, which PEFT calls fan_in_fan_out.
LORA_LAYER = 'transformer.h.{i}.'
LORA_MODULES = {
  'q': ('attn.c_attn', 0),
  'k': ('attn.c_attn', 1),
  'v': ('attn.c_attn', 2),
  'o': ('attn.c_proj', 0),
  'up': ('mlp.c_fc', 0),
  'down': ('mlp.c_proj', 0),
}
FAN_IN_FAN_OUT = True
_MLPS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
# each field that decides the family, with the values it allows
_DECIDES = {
  'norm': ('layernorm',),
  'positions': ('learned',),
  'use_bias': (True,),
  'mlp': ('gelu_tanh', 'gelu'),
}


def model_fields(c: HFConfig) -> dict:
  """lmjax's ModelConfig fields of a GPT-2 config.json (InteropError naming what lmjax cannot express)."""
  act = c.get('activation_function', 'gelu_new')
  unsupported = [
    f'{k}={c.get(k)!r}'
    for k, ok in (
      ('scale_attn_by_inverse_layer_idx', False),
      ('scale_attn_weights', True),
      ('add_cross_attention', False),
    )
    if k in c and c.get(k) != ok
  ]
  if act not in _MLPS:
    unsupported.append(f'activation_function={act!r} (lmjax has gelu_new and gelu)')
  if unsupported:
    raise InteropError(f'this GPT-2 config sets {", ".join(unsupported)}, which lmjax does not implement')
  d = c.int('n_embd')
  return dict(
    vocab_size=c.int('vocab_size'),
    max_len=c.int('n_positions'),
    n_layers=c.int('n_layer'),
    n_heads=c.int('n_head'),
    n_kv_heads=0,
    d_model=d,
    d_ff=c.int('n_inner', 0, minimum=0) or 4 * d,
    norm='layernorm',
    norm_eps=c.float('layer_norm_epsilon', 1e-5),
    positions='learned',
    mlp=_MLPS[act],
    tied_embeddings=c.bool('tie_word_embeddings', True),
    use_bias=True,
  )


def mismatches(cfg: ModelConfig) -> list[str]:
  """The fields an lmjax model would need changed to be a GPT-2 (empty when it is one)."""
  out = layout.mismatches(cfg, _DECIDES)
  if cfg.head_size * cfg.n_heads != cfg.d_model:
    out.append(f'model.head_dim={cfg.head_dim} (GPT-2 heads are d_model / n_heads wide)')
  if cfg.kv_heads != cfg.n_heads:
    out.append(f'model.n_kv_heads={cfg.n_kv_heads} (GPT-2 has no grouped-query attention)')
  return out


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers builds this model from (the tokenizer's ids are added by the caller)."""
  return {
    'architectures': [ARCHITECTURE],
    'model_type': MODEL_TYPE,
    'vocab_size': cfg.vocab_size,
    'n_positions': cfg.max_len,
    'n_embd': cfg.d_model,
    'n_layer': cfg.n_layers,
    'n_head': cfg.n_heads,
    'n_inner': cfg.ff_dim,
    'activation_function': 'gelu_new' if cfg.mlp == 'gelu_tanh' else 'gelu',
    'layer_norm_epsilon': cfg.norm_eps,
    'tie_word_embeddings': cfg.tied_embeddings,
    'resid_pdrop': 0.0,
    'embd_pdrop': 0.0,
    'attn_pdrop': 0.0,
    'torch_dtype': 'float32',
  }


def rename(names: set) -> dict:
  """{name in the files: name used here}: the hub's original gpt2 files lack the 'transformer.' prefix."""
  if any(n.startswith('h.') or n == 'wte.weight' for n in names) and not any(
    n.startswith('transformer.') for n in names
  ):
    return {n: f'transformer.{n}' for n in names}
  return {}


def expected(cfg: ModelConfig) -> dict:
  """{tensor name: shape} of a GPT-2 of this config."""
  D, F, V = cfg.d_model, cfg.ff_dim, cfg.vocab_size
  out = {'transformer.wte.weight': (V, D), 'transformer.wpe.weight': (cfg.max_len, D)}
  for i in range(cfg.n_layers):
    p = f'transformer.h.{i}.'
    for name, shape in (
      ('ln_1.weight', (D,)),
      ('ln_1.bias', (D,)),
      ('attn.c_attn.weight', (D, 3 * D)),
      ('attn.c_attn.bias', (3 * D,)),
      ('attn.c_proj.weight', (D, D)),
      ('attn.c_proj.bias', (D,)),
      ('ln_2.weight', (D,)),
      ('ln_2.bias', (D,)),
      ('mlp.c_fc.weight', (D, F)),
      ('mlp.c_fc.bias', (F,)),
      ('mlp.c_proj.weight', (F, D)),
      ('mlp.c_proj.bias', (D,)),
    ):
      out[p + name] = shape
  out.update({'transformer.ln_f.weight': (D,), 'transformer.ln_f.bias': (D,)})
  if not cfg.tied_embeddings:
    out['lm_head.weight'] = (V, D)
  return out


def to_params(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
  """lmjax's parameter tree (numpy float32) from the tensors `get(name)` returns."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
  params = {'embed': get('transformer.wte.weight'), 'pos_embed': get('transformer.wpe.weight')}
  for i in range(cfg.n_layers):
    t = lambda name, i=i: get(f'transformer.h.{i}.{name}')
    w, b = t('attn.c_attn.weight'), t('attn.c_attn.bias')
    params[f'block_{i}'] = {
      'ln1': {'scale': t('ln_1.weight'), 'bias': t('ln_1.bias')},
      'ln2': {'scale': t('ln_2.weight'), 'bias': t('ln_2.bias')},
      'attn': {
        'q_kernel': w[:, :D].reshape(D, H, K),
        'kv_kernel': np.stack([w[:, D : 2 * D].reshape(D, N, K), w[:, 2 * D :].reshape(D, N, K)], axis=1),
        'q_bias': b[:D].reshape(H, K),
        'kv_bias': np.stack([b[D : 2 * D].reshape(N, K), b[2 * D :].reshape(N, K)]),
        'o_kernel': t('attn.c_proj.weight').reshape(H, K, D),
        'o_bias': t('attn.c_proj.bias'),
      },
      'mlp': {
        'up_kernel': t('mlp.c_fc.weight'),
        'up_bias': t('mlp.c_fc.bias'),
        'down_kernel': t('mlp.c_proj.weight'),
        'down_bias': t('mlp.c_proj.bias'),
      },
    }
  params['ln_f'] = {'scale': get('transformer.ln_f.weight'), 'bias': get('transformer.ln_f.bias')}
  if not cfg.tied_embeddings:
    params['lm_head'] = np.ascontiguousarray(get('lm_head.weight').T)
  return params


def from_params(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(tensor name, float32 array) pairs of lmjax parameters: the inverse of to_params."""
  D, H, K = cfg.d_model, cfg.n_heads, cfg.head_size
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  yield 'transformer.wte.weight', a(params['embed'])
  yield 'transformer.wpe.weight', a(params['pos_embed'])
  for i in range(cfg.n_layers):
    p, blk = f'transformer.h.{i}.', params[f'block_{i}']
    at, mlp = blk['attn'], blk['mlp']
    kv, kvb = np.asarray(at['kv_kernel']), np.asarray(at['kv_bias'])
    w = np.concatenate(
      [np.asarray(at['q_kernel']).reshape(D, H * K), kv[:, 0].reshape(D, -1), kv[:, 1].reshape(D, -1)], 1
    )
    b = np.concatenate([np.asarray(at['q_bias']).reshape(-1), kvb[0].reshape(-1), kvb[1].reshape(-1)])
    yield from (
      (p + 'ln_1.weight', a(blk['ln1']['scale'])),
      (p + 'ln_1.bias', a(blk['ln1']['bias'])),
      (p + 'attn.c_attn.weight', a(w)),
      (p + 'attn.c_attn.bias', a(b)),
      (p + 'attn.c_proj.weight', a(np.asarray(at['o_kernel']).reshape(H * K, D))),
      (p + 'attn.c_proj.bias', a(at['o_bias'])),
      (p + 'ln_2.weight', a(blk['ln2']['scale'])),
      (p + 'ln_2.bias', a(blk['ln2']['bias'])),
      (p + 'mlp.c_fc.weight', a(mlp['up_kernel'])),
      (p + 'mlp.c_fc.bias', a(mlp['up_bias'])),
      (p + 'mlp.c_proj.weight', a(mlp['down_kernel'])),
      (p + 'mlp.c_proj.bias', a(mlp['down_bias'])),
    )
  yield 'transformer.ln_f.weight', a(params['ln_f']['scale'])
  yield 'transformer.ln_f.bias', a(params['ln_f']['bias'])
  if not cfg.tied_embeddings:
    yield 'lm_head.weight', a(np.asarray(params['lm_head']).T)
