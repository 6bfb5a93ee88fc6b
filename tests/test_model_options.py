"""The model options the Qwen, Mistral and Gemma families need, each a config field usable from scratch, checked
against a float64 numpy reference of the whole model, with packed rows, and with the KV-cache sampler: head_dim,
qkv_bias, norm_offset, embed_scale, post_norms, geglu, query_pre_attn_scalar, attn_window / global_every and
rope_local_theta (lmjax/model.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import compiling, model as model_lib, sample

# Every option on at once (a Gemma-3-shaped model with Qwen2's q/k/v biases), so one reference checks all of them
# and each interaction; a window of 5 over 16 positions, global attention in layer 2 of 2.
ALL = dict(
  vocab_size=37,
  max_len=16,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  d_model=32,
  head_dim=12,  # 4 heads of 12 on a width of 32: independent of d_model / n_heads
  d_ff=40,
  norm='rmsnorm',
  norm_eps=1e-6,
  positions='rope',
  rope_theta=1000.0,
  rope_local_theta=50.0,
  mlp='geglu',
  use_bias=False,
  qkv_bias=True,
  norm_offset=True,
  embed_scale=True,
  post_norms=True,
  qk_norm=True,
  query_pre_attn_scalar=20.0,
  attn_window=5,
  global_every=2,
  attn_softcap=3.0,
  final_softcap=4.0,
  tied_embeddings=True,
)


def _perturbed(params, seed=7):
  """Every leaf moved by noise: zero-initialised norm weights (norm_offset) and biases would hide their use."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def built():
  cfg = model_lib.ModelConfig(**ALL).validate()
  m = model_lib.Transformer(cfg)
  params = compiling.run_once(jax.jit(m.init), jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  return cfg, jax.jit(m.apply), _perturbed(nn.meta.unbox(params['params']))


def _reference(cfg, p, tokens_L, positions_L=None, segments_L=None):
  """Logits of one row, float64, written from the option descriptions (not from lmjax's code)."""
  f = lambda a: np.asarray(a, np.float64)
  L, H, N, K, D = len(tokens_L), cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.d_model
  pos = np.arange(L) if positions_L is None else np.asarray(positions_L)
  seg = np.ones(L, int) if segments_L is None else np.asarray(segments_L)
  norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * (1 + f(w))
  gelu_tanh = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  cap = lambda x, c: c * np.tanh(x / c)

  def rope(x, theta):
    freq = theta ** -(np.arange(0, K, 2) / K)
    ang = pos[:, None] * freq[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., : K // 2], x[..., K // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

  x = f(p['embed'])[np.asarray(tokens_L)] * np.sqrt(D)
  for i in range(cfg.n_layers):
    b = p[f'block_{i}']
    local = (i + 1) % cfg.global_every != 0
    a = b['attn']
    h = norm(x, b['ln1']['scale'])
    q = np.einsum('LD,DHK->LHK', h, f(a['q_kernel'])) + f(a['q_bias'])
    kv = np.einsum('LD,DCNK->CLNK', h, f(a['kv_kernel'])) + f(a['kv_bias'])[:, None]
    q, k, v = norm(q, a['q_norm']['scale']), norm(kv[0], a['k_norm']['scale']), kv[1]
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    q, k = rope(q, theta), rope(k, theta)
    s = np.einsum('LNGK,TNK->NGLT', q.reshape(L, N, H // N, K), k) / np.sqrt(cfg.query_pre_attn_scalar)
    s = cap(s, cfg.attn_softcap)
    t, qi = np.arange(L)[None], np.arange(L)[:, None]
    visible = (t <= qi) & (seg[None] == seg[:, None]) & ((qi - t < cfg.attn_window) | (not local))
    s = np.where(visible, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum('NGLT,TNK->LNGK', w / w.sum(-1, keepdims=True), v).reshape(L, H, K)
    x = x + norm(np.einsum('LHK,HKD->LD', o, f(a['o_kernel'])), b['ln1_post']['scale'])
    h = norm(x, b['ln2']['scale'])
    m = b['mlp']
    up = gelu_tanh(h @ f(m['gate_kernel'])) * (h @ f(m['up_kernel']))
    x = x + norm(up @ f(m['down_kernel']), b['ln2_post']['scale'])
  return cap(norm(x, p['ln_f']['scale']) @ f(p['embed']).T, cfg.final_softcap)


def test_every_option_together_gives_the_float64_reference(built):
  cfg, apply, params = built
  toks = jax.random.randint(jax.random.key(1), (2, cfg.max_len), 0, cfg.vocab_size)
  got = apply({'params': params}, toks)
  for row in range(2):
    np.testing.assert_allclose(got[row], _reference(cfg, params, toks[row]), atol=2e-4, rtol=2e-4)
  # and scanned layers read the same parameters stacked, windowed and global layers told apart inside the scan
  scan_cfg = model_lib.ModelConfig(**ALL, scan_layers=True)
  stacked = model_lib.stack_layers(params, cfg.n_layers)
  scanned = jax.jit(model_lib.Transformer(scan_cfg).apply)({'params': stacked}, toks)
  np.testing.assert_allclose(scanned, got, atol=1e-5, rtol=1e-5)


def test_packed_documents_each_give_their_own_logits(built):
  cfg, apply, params = built
  a = jax.random.randint(jax.random.key(3), (9,), 0, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(4), (7,), 0, cfg.vocab_size)
  row = jnp.concatenate([a, b])[None]
  pos = jnp.concatenate([jnp.arange(9), jnp.arange(7)])[None]
  seg = jnp.concatenate([jnp.ones(9, jnp.int32), jnp.full(7, 2, jnp.int32)])[None]
  packed = apply({'params': params}, row, pos, seg)
  # each document alone, right-padded to the row's length (causal: the padding changes nothing before it)
  one = (jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32))
  alone = lambda doc: apply({'params': params}, jnp.zeros((1, 16), jnp.int32).at[0, : len(doc)].set(doc), *one)[0]
  np.testing.assert_allclose(packed[0, :9], alone(a)[:9], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[0, 9:], alone(b)[:7], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[0], _reference(cfg, params, row[0], pos[0], seg[0]), atol=2e-4, rtol=2e-4)


def test_greedy_tokens_from_the_windowed_kv_cache_are_the_argmax_of_full_forward_passes(built):
  # Scanned layers, where each layer picks its mask (windowed or global) inside the scan; unscanned cache decoding
  # is tests/test_model.py's 'gemma' variant.
  _, _, params = built
  cfg, params = model_lib.ModelConfig(**ALL, scan_layers=True), model_lib.stack_layers(params, ALL['n_layers'])
  apply = jax.jit(model_lib.Transformer(cfg).apply)
  prompts = [np.array([3, 1, 4, 1, 5, 9, 2], np.int32), np.array([2, 7], np.int32)]  # batched: left padding
  got = sample.generate(params, cfg, prompts, max_new_tokens=8, temperature=0.0, sliding_window=False)
  for prompt, tokens in zip(prompts, got):
    seq = list(prompt)
    for _ in range(8):  # right-padded to one length (causal: the padding changes nothing before it), one compile
      row = jnp.zeros((1, cfg.max_len), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
      seq.append(int(jnp.argmax(apply({'params': params}, row)[0, len(seq) - 1])))
    assert list(tokens) == seq[len(prompt) :]
