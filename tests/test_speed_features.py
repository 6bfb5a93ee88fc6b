"""Speed features must not change the math: bf16 tracks f32, scan = no scan, remat = no remat, every attention
implementation = the reference, and the compilation cache is actually hit on a second run."""
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax import attention, model as model_lib, runtime, train as train_lib

SMALL = dict(vocab_size=37, max_len=16, n_layers=2, n_heads=4, d_model=32)


def run(f, *args):
  """Jit and run once at XLA -O0 (runtime.run_once): both sides of every comparison compile the same way, and
  the file stays fast on a 2-core CPU."""
  return runtime.run_once(jax.jit(f), *args)


def make(**kw):
  cfg = model_lib.ModelConfig(**{**SMALL, **kw}).validate()
  m = model_lib.Transformer(cfg)
  params = runtime.run_once(jax.jit(m.init), jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  return cfg, m, nn.meta.unbox(params['params'])


def batch(b=4, l=16, seed=1):
  t = jax.random.randint(jax.random.key(seed), (b, l + 1), 0, SMALL['vocab_size'])
  return {'inputs': t[:, :-1], 'targets': t[:, 1:]}


def test_bf16_compute_loss_tracks_float32_within_0p05_over_50_steps():
  b = batch(8)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    _, m, params = make(dtype=dtype)
    tx = optax.adamw(3e-3)
    state = train_lib.TrainState(jnp.int32(0), params, tx.init(params))
    step = functools.partial(train_lib.train_steps, model=m, tx=tx)
    batches = jax.tree.map(lambda x: jnp.broadcast_to(x, (50, *x.shape)), b)  # 50 steps in one scanned call
    _, metrics = run(step, state, batches, jax.random.key(0))
    losses[dtype] = np.asarray(metrics['train_loss'])
  assert losses['float32'][-1] < losses['float32'][0] - 1.0  # it learns, so tracking it means something
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], atol=0.05)


def test_scanned_model_with_stacked_params_gives_the_unscanned_outputs():
  cfg, m, params = make()
  _, m_scan, _ = make(scan_layers=True)
  tokens = batch()['inputs']
  seg = jnp.concatenate([jnp.ones((4, 6), jnp.int32), 2 * jnp.ones((4, 10), jnp.int32)], axis=1)
  want = run(m.apply, {'params': params}, tokens, None, seg)
  stacked = model_lib.stack_layers(params, cfg.n_layers)
  assert jax.tree.structure(stacked) == jax.tree.structure(make(scan_layers=True)[2])
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
    _, m, params = make(remat=policy, scan_layers=scan)
    grads[policy] = run(jax.grad(lambda p: train_lib.loss_terms(p, m, b)[0]), params)
  for policy in policies:  # recomputation may fuse differently: float32 rounding, no more
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads[policy], grads['none'])


def reference_attention(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, mask):
  """Textbook attention, one head at a time in numpy float64: the spec every implementation must meet."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BxLxHxK, k_BxNxTxK, v_BxNxTxK))
  B, L, H, K = q.shape
  G = H // k.shape[1]
  mask = np.broadcast_to(np.asarray(mask), (B, 1, 1, L, k.shape[2]))[:, 0, 0]
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      s = q[b, :, h] @ k[b, h // G].T / np.sqrt(K)
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


@pytest.mark.parametrize('impl', float32_implementations())
@pytest.mark.parametrize('kv_heads', [4, 1])
def test_attention_without_a_mask_is_causal_self_attention(impl, kv_heads):
  q, k, v, _ = attention_inputs(kv_heads)
  slots = jnp.arange(q.shape[1])
  got = jax.jit(functools.partial(attention.attend, mask=None, impl=impl, causal=True))(q, k, v)
  np.testing.assert_allclose(got, reference_attention(q, k, v, attention.make_mask(slots, slots)), atol=2e-5,
                             rtol=2e-5)
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
    mask = attention.make_mask(slots[L // 2:], slots)
  else:
    mask = None
  w = jax.random.normal(ks[3], q.shape)  # a loss that weighs every output element differently

  def loss(impl, q, k, v):
    o = attention.attend(q, k, v, mask, impl=impl, causal=causal)
    return jnp.sum(o.astype(jnp.float32) * w), o

  f32 = lambda *a: [x.astype(jnp.float32) for x in a]
  (_, want), want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, 'xla'), argnums=(0, 1, 2),
                                                     has_aux=True))(*f32(q, k, v))
  (_, got), got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, 'cudnn'), argnums=(0, 1, 2),
                                                   has_aux=True))(q, k, v)
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
    s = jnp.einsum('BLHK,BHTK->BHLT', q * K ** -0.5, k) + attention.bias_from_mask(mask)[:, 0]
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


_CACHE_PROBE = textwrap.dedent('''
    import sys, jax, jax.numpy as jnp
    from lmjax import runtime
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name ==
                                           '/jax/compilation_cache/cache_hits' else None)
    runtime.enable_compilation_cache(sys.argv[1])
    jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
    print('HITS', len(hits))
''')


def test_compilation_cache_is_hit_by_a_second_process(tmp_path):
  def hits():
    out = subprocess.run([sys.executable, '-c', _CACHE_PROBE, str(tmp_path / 'cache')], capture_output=True,
                         text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split('HITS')[-1])
  assert hits() == 0  # empty cache: compiled and written
  assert hits() >= 1  # same program in a new process: loaded from the cache


_EXECUTABLE_CACHE_PROBE = textwrap.dedent('''
    import sys, jax, jax.numpy as jnp
    from lmjax import runtime
    cache_dir, run = sys.argv[1:]
    runtime.enable_compilation_cache(cache_dir)
    f = lambda x: jnp.sin(x) @ x.T + jnp.cos(x).sum()
    x = jnp.arange(64.0).reshape(8, 8) / 64
    cache = runtime.ExecutableCache(cache_dir, {'run': run})
    got = cache.compile('f', jax.jit(f), (x,))(x)
    assert jnp.array_equal(got, jax.jit(f)(x)), 'the cached executable computes something else'
    print('ORIGIN', cache.origin['f'])
''')


def test_executable_cache_skips_tracing_and_never_stores_what_jax_cache_served(tmp_path):
  """Run 'b' differs from 'a' only in its config: a miss for lmjax's cache, a hit for JAX's (same program). XLA
  cannot re-serialize an executable JAX's cache deserialized -- stored, it would fail at run time -- so 'b' is
  never stored, and a later 'b' still runs."""
  def origin(run):
    out = subprocess.run([sys.executable, '-c', _EXECUTABLE_CACHE_PROBE, str(tmp_path), run], capture_output=True,
                         text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split('ORIGIN ')[-1].strip()
  assert [origin(r) for r in ('a', 'a', 'b', 'b')] == ['compiled', 'lmjax cache', "JAX's cache", "JAX's cache"]
  assert len(os.listdir(tmp_path / 'lmjax_executables')) == 1


def test_an_unreadable_cache_entry_is_compiled_again(tmp_path):
  f, x = jax.jit(lambda x: jnp.tanh(x) * 3.0), jnp.arange(5.0)
  runtime.ExecutableCache(str(tmp_path), {'a': 1}).compile('f', f, (x,))
  [entry] = (tmp_path / 'lmjax_executables').iterdir()
  entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a crash mid-write on a filesystem without rename
  cache = runtime.ExecutableCache(str(tmp_path), {'a': 1})
  np.testing.assert_array_equal(cache.compile('f', f, (x,))(x), jnp.tanh(x) * 3.0)
  assert cache.origin['f'] != 'lmjax cache'


def test_a_cache_that_cannot_be_written_costs_only_the_next_runs_head_start(tmp_path, capsys):
  (tmp_path / 'a_file').write_text('not a directory')
  cache = runtime.ExecutableCache(str(tmp_path / 'a_file'), {})
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(cache.compile('f', jax.jit(lambda x: x * 7.0), (x,))(x), x * 7.0)
  assert 'could not write' in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='needs torch installed (tensorboardX imports it)')
def test_the_logger_writes_tensorboard_events_without_importing_torch(tmp_path):
  # tensorboardX imports torch whenever it is installed, for seconds of start-up; the logger keeps it out, and
  # torch stays importable afterwards.
  code = (f'import os, sys\nfrom lmjax import metrics\nlog = metrics.Logger({str(tmp_path)!r}, progress_bar=False)\n'
          'log.write(1, {"train_loss": 2.5}, echo=False)\nlog.close()\n'
          'assert "torch" not in sys.modules, "torch was imported"\n'
          f'assert os.listdir(os.path.join({str(tmp_path)!r}, "tensorboard"))\n'
          'import torch\nprint("torch", torch.__version__)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'torch ' in out.stdout
