"""The model as a specification: causality, cache = full forward, stable names, remat/scan equivalences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools

import optax

from lmjax import attention, compiling, model as model_lib, steps

VARIANTS = {
  'gpt2': {},
  'llama': dict(norm='rmsnorm', positions='rope', mlp='swiglu', n_kv_heads=2, use_bias=False, tied_embeddings=False),
  'mqa': dict(n_kv_heads=1),
  'scan': dict(scan_layers=True),
  'chunked': dict(attention_chunk=5, n_kv_heads=2),  # causal query chunks of 5, 5, 5 and 1
  'dpa': dict(attention='dot_product_attention', n_kv_heads=2),  # jax.nn's kernel: is_causal, B' x 1 x L x T mask
  # the stability options, with RoPE after QK-norm
  'stable': dict(qk_norm=True, attn_softcap=1.5, final_softcap=2.0, positions='rope', n_kv_heads=2, norm='rmsnorm'),
  # Gemma 3's options (tests/test_model_options.py has their reference): a window of 5 in layer 1, layer 2 global
  'gemma': dict(
    norm='rmsnorm',
    norm_offset=True,
    embed_scale=True,
    post_norms=True,
    mlp='geglu',
    positions='rope',
    rope_local_theta=100.0,
    head_dim=12,
    n_kv_heads=2,
    qk_norm=True,
    query_pre_attn_scalar=10.0,
    attn_window=5,
    global_every=2,
    use_bias=False,
    qkv_bias=True,
  ),
}


def make(variant='gpt2', **kw):
  cfg = model_lib.ModelConfig(
    vocab_size=37, max_len=16, n_layers=2, n_heads=4, d_model=32, **{**VARIANTS[variant], **kw}
  ).validate()
  m = model_lib.Transformer(cfg)
  params = compiling.run_once(jax.jit(m.init), jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  params = nn.meta.unbox(params['params'])
  return cfg, Jitted(m), params


class Jitted:
  """model.apply under jit (eager Flax dispatches op by op: slow, and not what runs in training)."""

  def __init__(self, module):
    self.apply = jax.jit(module.apply)


def tokens(b, l, seed=1, vocab=37):
  return jax.random.randint(jax.random.key(seed), (b, l), 0, vocab)


@pytest.mark.parametrize('variant', VARIANTS)
def test_changing_token_t_changes_no_logit_before_t(variant):
  cfg, m, params = make(variant)
  x = tokens(2, cfg.max_len)
  base = m.apply({'params': params}, x)
  for t in (0, 5, cfg.max_len - 1):
    changed = m.apply({'params': params}, x.at[:, t].set((x[:, t] + 1) % cfg.vocab_size))
    np.testing.assert_array_equal(base[:, :t], changed[:, :t])
    assert not np.allclose(base[:, t:], changed[:, t:])  # and it does change the logits from t on


@pytest.mark.parametrize('variant', VARIANTS)
def test_kv_cache_decoding_gives_the_logits_of_the_full_forward_pass(variant):
  cfg, m, params = make(variant)
  x = tokens(3, cfg.max_len)
  full = m.apply({'params': params}, x)
  cache = model_lib.init_cache(cfg, 3, cfg.max_len)
  segs = jnp.ones((3, cfg.max_len), jnp.int32)
  prefill = 6
  logits, cache = m.apply(
    {'params': params},
    x[:, :prefill],
    segment_ids_BxL=segs[:, :prefill],
    cache=cache,
    cache_index=0,
    kv_segment_ids_BxT=segs,
  )
  steps = [logits]
  for t in range(prefill, cfg.max_len):
    pos = jnp.full((3, 1), t, jnp.int32)
    logits, cache = m.apply(
      {'params': params}, x[:, t : t + 1], pos, segs[:, t : t + 1], cache=cache, cache_index=t, kv_segment_ids_BxT=segs
    )
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def test_parameter_paths_are_stable():
  _, _, params = make('gpt2')
  paths = {'/'.join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert paths == {'embed', 'pos_embed', 'ln_f/scale', 'ln_f/bias'} | {
    f'block_{i}/{leaf}'
    for i in range(2)
    for leaf in (
      'ln1/scale',
      'ln1/bias',
      'ln2/scale',
      'ln2/bias',
      'attn/q_kernel',
      'attn/q_bias',
      'attn/kv_kernel',
      'attn/kv_bias',
      'attn/o_kernel',
      'attn/o_bias',
      'mlp/up_kernel',
      'mlp/up_bias',
      'mlp/down_kernel',
      'mlp/down_bias',
    )
  }


def test_gpt2_block_parameter_count_matches_the_formula():
  # GPT-2 block: 12 D^2 + 13 D per layer, plus embeddings and the final norm (tied head).
  cfg, _, params = make('gpt2')
  D, V, T, n = cfg.d_model, cfg.vocab_size, cfg.max_len, cfg.n_layers
  assert model_lib.count_params(params) == n * (12 * D * D + 13 * D) + V * D + T * D + 2 * D


def test_invalid_config_names_the_field():
  with pytest.raises(ValueError, match='n_heads'):
    model_lib.ModelConfig(vocab_size=10, max_len=8, d_model=30, n_heads=4).validate()
  with pytest.raises(ValueError, match='norm must be'):
    model_lib.ModelConfig(vocab_size=10, max_len=8, norm='batchnorm').validate()


def test_dropout_masks_keep_one_minus_rate_and_follow_their_seed():
  keep = jax.jit(lambda seed: attention.dropout_keep(seed, (1000, 1000), 0.2))
  a, b = keep(jnp.array([1, 2, 3, 4], jnp.uint32)), keep(jnp.array([1, 2, 3, 5], jnp.uint32))
  assert abs(float(a.mean()) - 0.8) < 0.002  # 5 standard deviations of a mean over 1e6 draws
  assert np.array_equal(a, keep(jnp.array([1, 2, 3, 4], jnp.uint32)))
  assert 0.6 < float((a == b).mean()) < 0.76  # independent masks agree on 0.8^2 + 0.2^2 = 68% of entries


@pytest.mark.parametrize('chunk', [0, 4])
def test_training_dropout_is_random_per_key_and_off_in_evaluation(chunk):
  cfg, _, params = make(dropout=0.2, attention_chunk=chunk)
  apply = jax.jit(model_lib.Transformer(cfg).apply, static_argnames='train')
  x = tokens(2, cfg.max_len)
  run = lambda seed, train: apply({'params': params}, x, train=train, rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(run(0, True), run(0, True))
  assert not np.allclose(run(0, True), run(1, True))
  np.testing.assert_array_equal(run(0, False), run(1, False))
  assert not np.allclose(run(0, True), run(0, False))


def test_hand_written_gelu_matches_exact_gelu_and_its_autodiff_gradient():
  x = jnp.linspace(-6.0, 6.0, 1001)
  f = lambda g: jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(g(x)))))(x)
  (v, dx), (v_ref, dx_ref) = f(model_lib.gelu), f(lambda x: jax.nn.gelu(x, approximate=False))
  np.testing.assert_allclose(v, v_ref, rtol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('center', [True, False])  # LayerNorm's and RMSNorm's standardisation
def test_hand_written_norm_backward_matches_autodiff_of_the_textbook_formula(center):
  x = jax.random.normal(jax.random.key(0), (3, 5, 48)) * 4.0 + 2.0
  w = jax.random.normal(jax.random.key(1), x.shape)  # weighs every output differently: all of dx is checked

  def textbook(x):
    xc = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
    return xc / jnp.sqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + 1e-5)

  f = lambda norm: jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(norm(x)) * w)))(x)
  (v, dx), (v_ref, dx_ref) = f(lambda x: model_lib.standardize(x, 1e-5, center)), f(textbook)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- speed options keep the math

SMALL = dict(vocab_size=37, max_len=16, n_layers=2, n_heads=4, d_model=32)


def run(f, *args):
  """Jit and run once at XLA -O0 (compiling.run_once): both sides of every comparison compile the same way, and
  the file stays fast on a 2-core CPU."""
  return compiling.run_once(jax.jit(f), *args)


def make_small(**kw):
  cfg = model_lib.ModelConfig(**{**SMALL, **kw}).validate()
  m = model_lib.Transformer(cfg)
  params = compiling.run_once(jax.jit(m.init), jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  return cfg, m, nn.meta.unbox(params['params'])


def batch(b=4, l=16, seed=1):
  t = jax.random.randint(jax.random.key(seed), (b, l + 1), 0, SMALL['vocab_size'])
  return {'inputs': t[:, :-1], 'targets': t[:, 1:]}


def test_bf16_compute_loss_tracks_float32_within_0p05_over_50_steps():
  b = batch(8)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    _, m, params = make_small(dtype=dtype)
    tx = optax.adamw(3e-3)
    state = steps.TrainState(jnp.int32(0), params, tx.init(params))
    step = functools.partial(steps.train_steps, model=m, tx=tx)
    batches = jax.tree.map(lambda x: jnp.broadcast_to(x, (50, *x.shape)), b)  # 50 steps in one scanned call
    _, metrics = run(step, state, batches, jax.random.key(0))
    losses[dtype] = np.asarray(metrics['train_loss'])
  assert losses['float32'][-1] < losses['float32'][0] - 1.0  # it learns, so tracking it means something
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], atol=0.05)


def test_scanned_model_with_stacked_params_gives_the_unscanned_outputs():
  cfg, m, params = make_small()
  _, m_scan, _ = make_small(scan_layers=True)
  tokens = batch()['inputs']
  seg = jnp.concatenate([jnp.ones((4, 6), jnp.int32), 2 * jnp.ones((4, 10), jnp.int32)], axis=1)
  want = run(m.apply, {'params': params}, tokens, None, seg)
  stacked = model_lib.stack_layers(params, cfg.n_layers)
  assert jax.tree.structure(stacked) == jax.tree.structure(make_small(scan_layers=True)[2])
  got = run(m_scan.apply, {'params': stacked}, tokens, None, seg)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  back = model_lib.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('scan', [False, True])
def test_every_remat_policy_gives_the_gradients_of_no_remat(scan):
  b = batch()
  if scan:  # packed rows: the segment mask goes through nn.remat inside nn.scan too (unscanned: no mask at all)
    b['segment_ids'] = jnp.concatenate([jnp.ones((4, 6), jnp.int32), jnp.full((4, 10), 2, jnp.int32)], axis=1)
  grads = {}
  policies = ('none', 'full', 'save_proj') if scan else tuple(model_lib.REMAT_POLICIES)
  for policy in policies:
    _, m, params = make_small(remat=policy, scan_layers=scan)
    grads[policy] = run(jax.grad(lambda p: steps.loss_terms(p, m, b)[0]), params)
  for policy in policies:  # recomputation may fuse differently: float32 rounding, no more
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads[policy], grads['none'])


def test_qk_norm_rms_normalises_each_head_of_q_and_k_before_rope():
  # The reference: q and k projected, each head divided by its RMS and scaled by its own learned vector, then
  # rotated, then textbook causal attention (numpy float64).
  cfg, _, params = make('stable', attn_softcap=0.0, final_softcap=0.0, norm_eps=1e-6)
  attn = model_lib.Attention(cfg)
  p = dict(params['block_0']['attn'])
  assert p['q_norm']['scale'].shape == p['k_norm']['scale'].shape == (cfg.head_size,)
  ks = jax.random.split(jax.random.key(3), 2)
  p['q_norm'] = {'scale': 1 + 0.5 * jax.random.normal(ks[0], (cfg.head_size,))}  # scales that matter
  p['k_norm'] = {'scale': 1 + 0.5 * jax.random.normal(ks[1], (cfg.head_size,))}
  B, L, H, N, K = 2, cfg.max_len, cfg.n_heads, cfg.kv_heads, cfg.head_size
  x = 3.0 * jax.random.normal(jax.random.key(4), (B, L, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  got, _ = jax.jit(functools.partial(attn.apply, train=False))({'params': p}, x, pos, None)

  f64 = lambda a: np.asarray(a, np.float64)
  xn = f64(x)
  q = np.einsum('BLD,DHK->BLHK', xn, f64(p['q_kernel']))
  kv = np.einsum('BLD,DCNK->CBLNK', xn, f64(p['kv_kernel']))
  rms = lambda a, scale: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-6) * f64(scale)
  q, k = rms(q, p['q_norm']['scale']), rms(kv[0], p['k_norm']['scale'])
  freq = f64(model_lib.rope_frequencies(cfg))
  ang = np.arange(L)[:, None] * freq[None]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  rot = lambda a: np.concatenate(
    [a[..., : K // 2] * cos - a[..., K // 2 :] * sin, a[..., K // 2 :] * cos + a[..., : K // 2] * sin], -1
  )
  q, k, v = rot(q), rot(k), kv[1]
  s = np.einsum('BLNGK,BTNK->BNGLT', q.reshape(B, L, N, H // N, K), k) / np.sqrt(K)
  s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  o = np.einsum('BNGLT,BTNK->BLNGK', w / w.sum(-1, keepdims=True), v).reshape(B, L, H, K)
  want = np.einsum('BLHK,HKD->BLD', o, f64(p['o_kernel']))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_the_final_soft_cap_is_cap_times_tanh_of_the_uncapped_logits():
  cfg, m, params = make('stable', final_softcap=0.0)
  _, m_capped, _ = make('stable', final_softcap=0.3)  # below the largest logit at init
  x = tokens(2, cfg.max_len)
  raw = np.asarray(m.apply({'params': params}, x), np.float64)
  capped = m_capped.apply({'params': params}, x)
  np.testing.assert_allclose(capped, 0.3 * np.tanh(raw / 0.3), atol=1e-6, rtol=1e-5)
  assert np.abs(raw).max() > 0.3 > np.abs(np.asarray(capped)).max()  # the cap was reached and held


def test_qk_norm_adds_one_scale_per_head_dim_for_q_and_for_k_to_each_layer():
  _, _, plain = make('llama')
  _, _, normed = make('llama', qk_norm=True)
  paths = lambda params: {'/'.join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert paths(normed) - paths(plain) == {f'block_{i}/attn/{w}_norm/scale' for i in range(2) for w in 'qk'}
