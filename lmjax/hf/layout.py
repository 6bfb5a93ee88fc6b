"""The tensors of the Llama-style decoders (Llama, Qwen2, Qwen3, Mistral, Gemma 2 and 3): names, shapes and the
mapping to lmjax's parameters, with the pieces some families add (q/k/v biases, QK-norm weights, Gemma's four
norms per layer), each present exactly when the lmjax config has the option. Also what every family decides:
the options a family has no way to express must be off (OFF).

torch's Linear weights are stored out x in, so each is transposed into lmjax's in x out kernels. transformers
rotates the two halves of each head (rotate_half), as lmjax's rope does: no permutation of q or k is needed.
D model width, H heads, N kv heads, K head dim, F feed-forward, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from lmjax.config import ModelConfig


class Where:
  """The values a test allows, in a family's table of {field: allowed values}: `value in Where(test)`."""

  def __init__(self, test):
    self.test = test

  def __contains__(self, value) -> bool:
    return bool(self.test(value))


ANY = Where(lambda value: True)  # a field the family expresses whatever its value

# The options a family must leave off unless its own table allows them ({field: allowed values}); each family's
# mismatches() checks {**OFF, **its own}. A new model option belongs here, or export would write a model without it.
OFF = {
  'qk_norm': (False,),
  'attn_softcap': (0.0,),
  'final_softcap': (0.0,),
  'qkv_bias': (False,),
  'norm_offset': (False,),
  'embed_scale': (False,),
  'post_norms': (False,),
  'query_pre_attn_scalar': (0.0,),
  'attn_window': (0,),
  'global_every': (0,),
  'rope_local_theta': (0.0,),
}


def mismatches(cfg: ModelConfig, decides: dict) -> list[str]:
  """'model.FIELD=value' for each field of `cfg` outside what `decides` ({**OFF, **the family's}) allows."""
  return [f'model.{k}={getattr(cfg, k)!r}' for k, ok in {**OFF, **decides}.items() if getattr(cfg, k) not in ok]


def _norms(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
  """(lmjax norm, HF tensor) of one layer. Gemma's sandwich names its pre-MLP norm pre_feedforward_layernorm and
  uses post_attention_layernorm for the attention output's own norm; Llama's post_attention_layernorm is the
  pre-MLP norm."""
  if cfg.post_norms:
    return (
      ('ln1', 'input_layernorm'),
      ('ln1_post', 'post_attention_layernorm'),
      ('ln2', 'pre_feedforward_layernorm'),
      ('ln2_post', 'post_feedforward_layernorm'),
    )
  return (('ln1', 'input_layernorm'), ('ln2', 'post_attention_layernorm'))


def expected(cfg: ModelConfig) -> dict:
  """{tensor name: shape} of a model of this config."""
  D, F, V, H, N, K = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_size
  out = {'model.embed_tokens.weight': (V, D)}
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    shapes = [(f'{hf}.weight', (D,)) for _, hf in _norms(cfg)]
    shapes += [
      ('self_attn.q_proj.weight', (H * K, D)),
      ('self_attn.k_proj.weight', (N * K, D)),
      ('self_attn.v_proj.weight', (N * K, D)),
      ('self_attn.o_proj.weight', (D, H * K)),
      ('mlp.gate_proj.weight', (F, D)),
      ('mlp.up_proj.weight', (F, D)),
      ('mlp.down_proj.weight', (D, F)),
    ]
    if cfg.qkv_bias:
      shapes += [('self_attn.q_proj.bias', (H * K,)), ('self_attn.k_proj.bias', (N * K,))]
      shapes += [('self_attn.v_proj.bias', (N * K,))]
    if cfg.qk_norm:
      shapes += [('self_attn.q_norm.weight', (K,)), ('self_attn.k_norm.weight', (K,))]
    out.update((p + name, shape) for name, shape in shapes)
  out['model.norm.weight'] = (D,)
  if not cfg.tied_embeddings:
    out['lm_head.weight'] = (V, D)
  return out


def to_params(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
  """lmjax's parameter tree (numpy float32) from the tensors `get(name)` returns."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
  T = lambda x: np.ascontiguousarray(x.T)
  params = {'embed': get('model.embed_tokens.weight')}
  for i in range(cfg.n_layers):
    t = lambda name, i=i: get(f'model.layers.{i}.{name}')
    k, v = t('self_attn.k_proj.weight').T.reshape(D, N, K), t('self_attn.v_proj.weight').T.reshape(D, N, K)
    attn = {
      'q_kernel': T(t('self_attn.q_proj.weight')).reshape(D, H, K),
      'kv_kernel': np.stack([k, v], axis=1),
      'o_kernel': T(t('self_attn.o_proj.weight')).reshape(H, K, D),
    }
    if cfg.qkv_bias:
      attn['q_bias'] = t('self_attn.q_proj.bias').reshape(H, K)
      attn['kv_bias'] = np.stack([t('self_attn.k_proj.bias').reshape(N, K), t('self_attn.v_proj.bias').reshape(N, K)])
    if cfg.qk_norm:
      attn['q_norm'] = {'scale': t('self_attn.q_norm.weight')}
      attn['k_norm'] = {'scale': t('self_attn.k_norm.weight')}
    block = {ours: {'scale': t(f'{hf}.weight')} for ours, hf in _norms(cfg)}
    block['attn'] = attn
    block['mlp'] = {
      'gate_kernel': T(t('mlp.gate_proj.weight')),
      'up_kernel': T(t('mlp.up_proj.weight')),
      'down_kernel': T(t('mlp.down_proj.weight')),
    }
    params[f'block_{i}'] = block
  params['ln_f'] = {'scale': get('model.norm.weight')}
  if not cfg.tied_embeddings:
    params['lm_head'] = T(get('lm_head.weight'))
  return params


def from_params(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(tensor name, float32 array) pairs of lmjax parameters: the inverse of to_params."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  yield 'model.embed_tokens.weight', a(params['embed'])
  for i in range(cfg.n_layers):
    p, blk = f'model.layers.{i}.', params[f'block_{i}']
    at, mlp = blk['attn'], blk['mlp']
    kv = np.asarray(at['kv_kernel'])
    yield from ((f'{p}{hf}.weight', a(blk[ours]['scale'])) for ours, hf in _norms(cfg))
    yield from (
      (p + 'self_attn.q_proj.weight', a(np.asarray(at['q_kernel']).reshape(D, H * K).T)),
      (p + 'self_attn.k_proj.weight', a(kv[:, 0].reshape(D, N * K).T)),
      (p + 'self_attn.v_proj.weight', a(kv[:, 1].reshape(D, N * K).T)),
      (p + 'self_attn.o_proj.weight', a(np.asarray(at['o_kernel']).reshape(H * K, D).T)),
      (p + 'mlp.gate_proj.weight', a(np.asarray(mlp['gate_kernel']).T)),
      (p + 'mlp.up_proj.weight', a(np.asarray(mlp['up_kernel']).T)),
      (p + 'mlp.down_proj.weight', a(np.asarray(mlp['down_kernel']).T)),
    )
    if cfg.qkv_bias:
      kvb = np.asarray(at['kv_bias'])
      yield p + 'self_attn.q_proj.bias', a(np.asarray(at['q_bias']).reshape(-1))
      yield p + 'self_attn.k_proj.bias', a(kvb[0].reshape(-1))
      yield p + 'self_attn.v_proj.bias', a(kvb[1].reshape(-1))
    if cfg.qk_norm:
      yield p + 'self_attn.q_norm.weight', a(at['q_norm']['scale'])
      yield p + 'self_attn.k_norm.weight', a(at['k_norm']['scale'])
  yield 'model.norm.weight', a(params['ln_f']['scale'])
  if not cfg.tied_embeddings:
    yield 'lm_head.weight', a(np.asarray(params['lm_head']).T)


def decoder_fields(c) -> dict:
  """The ModelConfig fields every Llama-style config.json states the same way (sizes, RMSNorm eps, tying), with
  head_dim taken when it is stated and differs from hidden_size / num_attention_heads."""
  d, heads = c.int('hidden_size'), c.int('num_attention_heads')
  head_dim = c.int('head_dim', 0, minimum=0)
  return dict(
    vocab_size=c.int('vocab_size'),
    max_len=c.int('max_position_embeddings'),
    n_layers=c.int('num_hidden_layers'),
    n_heads=heads,
    n_kv_heads=c.int('num_key_value_heads', heads),
    d_model=d,
    d_ff=c.int('intermediate_size'),
    head_dim=0 if head_dim == d // heads and d % heads == 0 else head_dim,
    norm='rmsnorm',
    norm_eps=c.float('rms_norm_eps', 1e-6),
    positions='rope',
    use_bias=False,
  )


def decoder_config(cfg: ModelConfig, architecture: str, model_type: str) -> dict:
  """The config.json keys every Llama-style family writes the same way (the family adds its own)."""
  return {
    'architectures': [architecture],
    'model_type': model_type,
    'vocab_size': cfg.vocab_size,
    'max_position_embeddings': cfg.max_len,
    'hidden_size': cfg.d_model,
    'intermediate_size': cfg.ff_dim,
    'num_hidden_layers': cfg.n_layers,
    'num_attention_heads': cfg.n_heads,
    'num_key_value_heads': cfg.kv_heads,
    'head_dim': cfg.head_size,
    'rms_norm_eps': cfg.norm_eps,
    'tie_word_embeddings': cfg.tied_embeddings,
    'torch_dtype': 'float32',
  }
