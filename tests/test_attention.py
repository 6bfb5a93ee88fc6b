"""Every attention implementation equals the float64 reference: masks, segments, GQA/MQA, chunks, dropout,
splash (in Pallas's interpreter) and cuDNN (on a GPU), and the 'auto' rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import attention, model as model_lib
from lmjax.errors import ConfigError

SMALL = dict(vocab_size=37, max_len=16, n_layers=2, n_heads=4, d_model=32)


def reference_attention(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, mask, cap=0.0):
  """Textbook attention, one head at a time in numpy float64: the spec every implementation must meet. `cap`: scores
  soft-capped to cap * tanh(s / cap) before the mask (Gemma 2)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BxLxHxK, k_BxNxTxK, v_BxNxTxK))
  B, L, H, K = q.shape
  G = H // k.shape[1]
  mask = np.broadcast_to(np.asarray(mask), (B, 1, 1, L, k.shape[2]))[:, 0, 0]
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      s = q[b, :, h] @ k[b, h // G].T / np.sqrt(K)
      s = cap * np.tanh(s / cap) if cap else s
      s = np.where(mask[b], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, h // G]
  return out


def float32_implementations():
  """The implementations that take float32 inputs at any length (cuDNN's kernel takes bf16/fp16 only: tested below,
  on GPU; splash takes lengths in multiples of 128: tested below, in Pallas's interpreter)."""
  return [i for i in attention.IMPLEMENTATIONS if i not in ('cudnn', 'splash')]


def attention_inputs(kv_heads, B=2, L=8, H=4, K=8):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (B, L, H, K))
  k, v = (jax.random.normal(kk, (B, kv_heads, L, K)) for kk in ks[1:])
  seg_BxL = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)  # packed; left padding
  slots = jnp.arange(L)
  return q, k, v, attention.make_mask(slots, slots, seg_BxL, seg_BxL)


@pytest.mark.parametrize('impl', float32_implementations())
@pytest.mark.parametrize('kv_heads', [4, 2, 1])
@pytest.mark.parametrize('causal', [False, True])
def test_attention_implementation_matches_the_reference_with_causal_mask_and_segments(impl, kv_heads, causal):
  # causal=True is the model's self-attention path: kernels get is_causal on top of the segment mask.
  q, k, v, mask = attention_inputs(kv_heads)
  got = jax.jit(functools.partial(attention.attend, impl=impl, causal=causal))(q, k, v, mask)
  np.testing.assert_allclose(got, reference_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('impl', float32_implementations())
@pytest.mark.parametrize('kv_heads', [4, 1])
def test_segment_ids_as_the_mask_give_what_their_boolean_mask_gives(impl, kv_heads):
  # Self-attention in the model passes segment ids (B x L), never an L x T mask; each kernel builds its own.
  q, k, v, mask = attention_inputs(kv_heads)
  seg_BxL = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)  # attention_inputs' rows
  got = jax.jit(functools.partial(attention.attend, impl=impl, causal=True))(q, k, v, seg_BxL)
  np.testing.assert_allclose(got, reference_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match='causal=True'):
    attention.attend(q, k, v, seg_BxL, impl=impl)


@pytest.mark.parametrize('impl, chunk', [('xla', 0), ('xla', 3), ('dot_product_attention', 0)])
def test_a_window_and_a_query_scale_match_the_reference_on_segments_and_on_their_boolean_mask(impl, chunk):
  # model.attn_window and model.query_pre_attn_scalar: keys fewer than 3 slots back, scores times 1/sqrt(5)
  # instead of 1/sqrt(K) (the reference's 1/sqrt(K) is undone by scaling q by sqrt(K / 5)); chunks are 'xla''s.
  q, k, v, mask = attention_inputs(2)
  K, slots = q.shape[-1], jnp.arange(q.shape[1])
  seg_BxL = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)  # attention_inputs' rows
  want = reference_attention(q * np.sqrt(K / 5), k, v, mask & attention.make_mask(slots, slots, window=3))
  attend = functools.partial(attention.attend, impl=impl, causal=True, causal_chunk=chunk, scale=5**-0.5, window=3)
  for given in (seg_BxL, mask):
    np.testing.assert_allclose(jax.jit(attend)(q, k, v, given), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('impl', float32_implementations())
@pytest.mark.parametrize('kv_heads', [4, 1])
def test_attention_without_a_mask_is_causal_self_attention(impl, kv_heads):
  q, k, v, _ = attention_inputs(kv_heads)
  slots = jnp.arange(q.shape[1])
  got = jax.jit(functools.partial(attention.attend, mask=None, impl=impl, causal=True))(q, k, v)
  np.testing.assert_allclose(got, reference_attention(q, k, v, attention.make_mask(slots, slots)), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match='causal=True'):
    attention.attend(q, k, v, None, impl=impl)
  with pytest.raises(ValueError, match='causal=True'):
    attention.attend(q, k, v, attention.make_mask(slots, slots), impl=impl, causal_chunk=4)


def test_auto_attention_picks_cudnn_only_for_causal_bf16_self_attention_without_dropout_on_gpu(monkeypatch):
  here = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 1024) == here
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # the rule itself, on any host
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 1024) == 'cudnn'
  assert attention.resolve('auto', jnp.float16, 0.0, True, 1024) == 'cudnn'
  assert attention.resolve('auto', jnp.float32, 0.0, True, 1024) == 'xla'  # the kernel takes 16-bit inputs only
  assert attention.resolve('auto', jnp.bfloat16, 0.1, True, 1024) == 'xla'  # attention dropout: 'xla' only
  assert attention.resolve('auto', jnp.bfloat16, 0.0, False, 1024) == 'xla'  # decoding over a cache
  assert attention.resolve('cudnn', jnp.bfloat16, 0.0, False, 1024) == 'cudnn'  # asked for by name: as asked


@pytest.mark.filterwarnings("ignore:attention='splash' on cpu")
def test_auto_attention_picks_splash_on_tpu_for_causal_self_attention_in_tiles_of_128(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')  # the rule itself, on any host
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 2048) == 'splash'
  assert attention.resolve('auto', jnp.float32, 0.0, True, 128) == 'splash'
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 100) == 'xla'  # not in whole tiles
  assert attention.resolve('auto', jnp.bfloat16, 0.1, True, 2048) == 'xla'  # attention dropout: 'xla' only
  assert attention.resolve('auto', jnp.bfloat16, 0.0, False, 2048) == 'xla'  # decoding over a cache
  assert attention.resolve('splash', jnp.bfloat16, 0.0, False, 2048) == 'xla'  # decoding, even when asked by name
  q, k, v, seg_BxL = splash_inputs(2)
  slots = jnp.arange(q.shape[1])
  mask = attention.make_mask(slots, slots, seg_BxL, seg_BxL)  # a boolean mask, which the kernel cannot read: 'xla'
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 128, boolean_mask=True) == 'xla'
  got = attention.attend(q, k, v, mask, impl='auto', causal=True)
  np.testing.assert_allclose(got, reference_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def splash_inputs(kv_heads, B=2, L=128, H=4, K=8):
  """Inputs at the kernel's smallest tile (128); packed rows that differ per batch row, the second padded first."""
  ks = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(ks[0], (B, L, H, K))
  k, v = (jax.random.normal(kk, (B, kv_heads, L, K)) for kk in ks[1:])
  slots = jnp.arange(L)
  seg_BxL = jnp.stack([jnp.where(slots < 50, 1, 2), jnp.where(slots < 20, 0, jnp.where(slots < 90, 1, 2))])
  return q, k, v, seg_BxL.astype(jnp.int32)


@pytest.mark.filterwarnings("ignore:attention='splash' on cpu")
@pytest.mark.parametrize('kv_heads', [4, 2, 1])
@pytest.mark.parametrize('packed', [False, True])
def test_splash_attention_matches_the_reference_and_its_gradients_match_xla(kv_heads, packed):
  # Off TPU the Pallas kernel runs in its interpreter: the kernel's own code (tiles, online softmax, block
  # skipping, its backward) on CPU.
  q, k, v, seg_BxL = splash_inputs(kv_heads)
  seg_BxL = seg_BxL if packed else None
  slots = jnp.arange(q.shape[1])
  attend = lambda impl: functools.partial(attention.attend, mask=seg_BxL, impl=impl, causal=True)
  got = jax.jit(attend('splash'))(q, k, v)
  want = reference_attention(q, k, v, attention.make_mask(slots, slots, seg_BxL, seg_BxL))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  w = jax.random.normal(jax.random.key(6), q.shape)  # a loss that weighs every output element differently
  grads = lambda impl: jax.jit(jax.grad(lambda *a: jnp.sum(attend(impl)(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4), grads('splash'), grads('xla'))


@pytest.mark.filterwarnings("ignore:attention='splash' on cpu")
def test_splash_attention_refuses_what_it_cannot_do_and_decodes_with_xla():
  for bad, match in (({'max_len': 64}, 'multiple of 128'), ({'max_len': 128, 'dropout': 0.1}, 'no attention dropout')):
    with pytest.raises(ValueError, match=match):  # the config says what to change before anything is traced
      model_lib.ModelConfig(**{**SMALL, 'attention': 'splash', **bad}).validate()
  q, k, v, seg_BxL = splash_inputs(2)
  slots = jnp.arange(q.shape[1])
  with pytest.raises(ValueError, match='multiple of 128'):
    attention.attend(q[:, :64], k[:, :, :64], v[:, :, :64], None, impl='splash', causal=True)
  with pytest.raises(ValueError, match='segment ids'):
    attention.attend(q, k, v, attention.make_mask(slots, slots, seg_BxL, seg_BxL), impl='splash', causal=True)
  with pytest.raises(ValueError, match='no attention dropout'):
    attention.attend(q, k, v, None, impl='splash', causal=True, dropout=0.1, dropout_rng=jax.random.key(0))
  decode_mask = attention.make_mask(slots[96:], slots)  # 32 queries at slots 96..127 over a 128-slot cache
  got = attention.attend(q[:, 96:], k, v, decode_mask, impl='splash')
  np.testing.assert_allclose(got, reference_attention(q[:, 96:], k, v, decode_mask), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
@pytest.mark.parametrize('case', ['causal', 'segments', 'decode'])
@pytest.mark.parametrize('kv_heads', [8, 2])
def test_cudnn_attention_matches_the_reference_in_bfloat16_values_and_gradients(case, kv_heads):
  # Shapes cuDNN's flash kernel takes (head dim 64, lengths multiples of 64). 'segments': packed rows, different in
  # each batch row, with is_causal; 'decode': 64 queries at slots 64..127 over a 128-slot cache (causal=False, a
  # mask of batch 1). The reference is 'xla' attention on the same bf16-rounded inputs in float32, so the tolerance
  # covers bf16 rounding inside the kernel, not input rounding.
  B, L, H, K = 2, 128, 8, 64
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (B, L // 2 if case == 'decode' else L, H, K)).astype(jnp.bfloat16)
  k, v = (jax.random.normal(kk, (B, kv_heads, L, K)).astype(jnp.bfloat16) for kk in ks[1:3])
  slots = jnp.arange(L)
  causal = case != 'decode'
  if case == 'segments':
    seg_BxL = jnp.stack([jnp.where(slots < 50, 1, 2), jnp.where(slots < 90, 1, 2)]).astype(jnp.int32)
    mask = attention.make_mask(slots, slots, seg_BxL, seg_BxL)
  elif case == 'decode':
    mask = attention.make_mask(slots[L // 2 :], slots)
  else:
    mask = None
  w = jax.random.normal(ks[3], q.shape)  # a loss that weighs every output element differently

  def loss(impl, q, k, v):
    o = attention.attend(q, k, v, mask, impl=impl, causal=causal)
    return jnp.sum(o.astype(jnp.float32) * w), o

  f32 = lambda *a: [x.astype(jnp.float32) for x in a]
  (_, want), want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, 'xla'), argnums=(0, 1, 2), has_aux=True))(
    *f32(q, k, v)
  )
  (_, got), got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, 'cudnn'), argnums=(0, 1, 2), has_aux=True))(
    q, k, v
  )
  assert got.dtype == jnp.bfloat16
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  assert rel(got, want) < 1e-2
  for g, r in zip(got_grads, want_grads):
    assert rel(g, r) < 2e-2


@pytest.mark.parametrize('chunk', [1, 3, 4])  # 3: a shorter last chunk
@pytest.mark.parametrize('kv_heads', [4, 1])
def test_causal_chunks_match_the_reference_and_their_gradients_match_one_block(chunk, kv_heads):
  q, k, v, mask = attention_inputs(kv_heads)
  attend = lambda c: jax.jit(lambda *a: attention.attend(*a, mask, causal=True, causal_chunk=c))
  np.testing.assert_allclose(attend(chunk)(q, k, v), reference_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)
  grad = lambda c: jax.grad(lambda *a: jnp.sum(jnp.sin(attend(c)(*a))), argnums=(0, 1, 2))(q, k, v)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=2e-5), grad(chunk), grad(0))


@pytest.mark.parametrize('dropout', [0.0, 0.3])
def test_attention_gradients_with_dropout_match_autodiff_of_the_plain_formula(dropout):
  # The textbook formula, with the mask `attend` draws from the same key (one chunk: attention._xla's seeds), is the
  # reference for 'xla' attention's values and gradients, dropout included.
  q, k, v, mask = attention_inputs(4)
  key = jax.random.key(7)
  B, L, H, K = q.shape

  def plain(q, k, v):
    s = jnp.einsum('BLHK,BHTK->BHLT', q * K**-0.5, k) + attention.bias_from_mask(mask)[:, 0]
    p = jax.nn.softmax(s, axis=-1)
    if dropout:
      keep = attention.dropout_keep(jax.random.bits(key, (1, 4), jnp.uint32)[0], p.shape, dropout)
      p = jnp.where(keep, p / (1 - dropout), 0.0)
    return jnp.einsum('BHLT,BHTK->BLHK', p, v)

  ours = lambda q, k, v: attention.attend(q, k, v, mask, dropout=dropout, dropout_rng=key)
  for f in (ours, plain):
    assert jax.jit(f)(q, k, v).shape == (B, L, H, K)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(plain)(q, k, v), atol=2e-5, rtol=2e-5)
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=2e-5), grad(ours), grad(plain))


def test_causal_chunk_auto_rule():
  assert attention.chunk_for(256, 0) == 0 and attention.chunk_for(256, 64) == 64 and attention.chunk_for(64, 64) == 0
  if jax.default_backend() == 'cpu':
    assert [attention.chunk_for(n, -1) for n in (64, 128, 256, 512, 1024, 4096)] == [0, 32, 64, 128, 128, 256]


@pytest.mark.parametrize('impl', ['xla', 'auto'])
@pytest.mark.parametrize('kv_heads', [4, 1])
@pytest.mark.parametrize('chunk', [0, 3])
def test_soft_capped_attention_matches_the_reference_in_values_and_decoding(impl, kv_heads, chunk):
  q, k, v, mask = attention_inputs(kv_heads)
  q = q * 4.0  # scores well past the cap, where tanh bends them
  seg_BxL = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)  # attention_inputs' rows
  attend = functools.partial(attention.attend, impl=impl, softcap=2.0)
  got = jax.jit(functools.partial(attend, causal=True, causal_chunk=chunk))(q, k, v, seg_BxL)
  want = reference_attention(q, k, v, mask, cap=2.0)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  assert not np.allclose(want, reference_attention(q, k, v, mask), atol=1e-2)  # the cap does change the output
  slots = jnp.arange(q.shape[1])
  decode = attention.make_mask(slots[5:], slots, seg_BxL[:, 5:], seg_BxL)  # three queries over the whole cache
  got = jax.jit(attend)(q[:, 5:], k, v, decode)
  np.testing.assert_allclose(got, reference_attention(q[:, 5:], k, v, decode, cap=2.0), atol=2e-5, rtol=2e-5)


@pytest.mark.filterwarnings("ignore:attention='splash' on cpu")
def test_soft_capped_splash_attention_matches_the_reference():
  q, k, v, seg_BxL = splash_inputs(2)
  q = q * 4.0
  slots = jnp.arange(q.shape[1])
  got = jax.jit(functools.partial(attention.attend, impl='splash', causal=True, softcap=2.0))(q, k, v, seg_BxL)
  want = reference_attention(q, k, v, attention.make_mask(slots, slots, seg_BxL, seg_BxL), cap=2.0)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_a_soft_cap_keeps_auto_off_cudnn_and_an_uncapping_kernel_named_is_a_config_error(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # the rule itself, on any host
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 1024) == 'cudnn'
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 1024, cap=50.0) == 'xla'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert attention.resolve('auto', jnp.bfloat16, 0.0, True, 1024, cap=50.0) == 'splash'  # splash caps scores itself
  for impl in ('cudnn', 'dot_product_attention'):
    with pytest.raises(ConfigError, match=f"attention='{impl}' cannot soft-cap"):
      model_lib.ModelConfig(**SMALL, attention=impl, attn_softcap=50.0).validate()
    q, k, v, _ = attention_inputs(4)
    with pytest.raises(ValueError, match='cannot soft-cap'):
      attention.attend(q, k, v, None, impl=impl, causal=True, softcap=50.0)
  for ok in ('xla', 'splash', 'auto'):
    model_lib.ModelConfig(**{**SMALL, 'max_len': 128}, attention=ok, attn_softcap=50.0).validate()
  with pytest.raises(ConfigError, match='attn_softcap and final_softcap must be >= 0'):
    model_lib.ModelConfig(**SMALL, final_softcap=-1.0).validate()
