"""Attention kernels and the one mask rule they all honour.

Layouts: queries q_BxLxHxK; keys and values k_BxNxTxK, v_BxNxTxK (kv heads before time, the KV-cache layout, so
decoding writes a time slot without transposing the cache). Output o_BxLxHxK. Grouped-query attention: query head
h reads kv head h // G.

Implementations (ModelConfig.attention):
  'xla'   -- einsum + masked float32 softmax; runs everywhere and is the reference.
  'dot_product_attention' -- jax.nn.dot_product_attention, XLA lowering (any backend).
  'cudnn' -- jax.nn.dot_product_attention on cuDNN's fused flash kernel (GPU only, bf16/fp16, no dropout).
             Self-attention passes is_causal (the kernel skips the blocks above the diagonal); on an H100 the
             1B config (configs/gpu_1b.py) benchmarks at 50% MFU with it (`lmjax bench`).
  'splash' -- JAX's Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu), the flash kernel for TPU:
             causal self-attention with segment ids, grouped kv heads, no dropout, lengths a multiple of 128.
             Under a mesh of several devices it runs per shard (batch over data/fsdp, kv heads over tensor). Calls
             with a KV cache (decoding) run 'xla'. Traced for a CPU mesh it runs in Pallas's interpreter: exact and
             slow, which is how the CPU tests check its numbers; traced for a TPU mesh it compiles to a Mosaic kernel
             (tests/test_tpu_plan.py compiles it for a v5e slice from a CPU host); it has not yet run on a TPU here.
             Every choice here reads the platform of the mesh being traced (parallel.platform), not the host's.
  'auto'  -- 'cudnn' on GPU or 'splash' on TPU for causal self-attention when they apply, else 'xla' (resolve).

The mask enters as an additive float32 bias (0 or -1e30) rather than a `where` select, and dropout masks come
from one uint32 per element compared against a threshold: both measured cheaper in the CPU backward pass.

Causal chunks ('xla', a whole sequence attending to itself: training, eval): queries go in chunks of `causal_chunk`,
and chunk i reads only the keys up to its own last query; the score blocks above the diagonal, which the causal mask
hides anyway, are never computed, stored or given dropout bits. Same math, about half the score work at many
chunks, and far smaller score buffers, which is what a CPU's caches reward (docs/performance.md has the
measurements). `chunk_for` picks the length; other backends keep one block.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from lmjax import config as config_lib, parallel

IMPLEMENTATIONS = config_lib.ATTENTION  # the names config.validate accepts

_NEG_INF = -1e30  # finite: a fully masked row (never produced by make_mask) would give uniform weights, not NaN


def make_mask(q_slot_L, kv_slot_T, q_segment_BxL=None, kv_segment_BxT=None, window=0):
  """Boolean mask, broadcastable to B x N x G x L x T: key visible iff its slot is not after the query's slot
  and it lies in the same segment (packed document; 0 = padding) or in a shared prefix: a negative segment id is
  seen by every later query (one context followed by the several continuations that condition on it,
  lmjax/evals/loglikelihood.py; only this explicit mask knows the rule, so such rows go through a KV cache).
  window > 0 (an int, or traced in scanned layers): also fewer than `window` slots back (sliding-window attention,
  transformers' `kv_idx > q_idx - sliding_window`).

  Every query sees at least its own slot, so no softmax row is ever empty.
  """
  mask_LxT = kv_slot_T[None, :] <= q_slot_L[:, None]
  if not _no_window(window):
    mask_LxT = mask_LxT & (kv_slot_T[None, :] > q_slot_L[:, None] - window)
  if q_segment_BxL is None or kv_segment_BxT is None:
    return mask_LxT[None, None, None]
  same_BxLxT = (q_segment_BxL[:, :, None] == kv_segment_BxT[:, None, :]) | (kv_segment_BxT[:, None, :] < 0)
  return (mask_LxT[None] & same_BxLxT)[:, None, None]


def _no_window(window) -> bool:
  return isinstance(window, int) and window == 0


def bias_from_mask(mask):
  """Additive float32 bias (0 visible, -1e30 hidden) from make_mask's boolean mask. Adding a bias instead of
  selecting with `where` keeps the mask out of the backward pass: the gradient of an add is the identity."""
  return jnp.where(mask, jnp.float32(0), jnp.float32(_NEG_INF))


def dropout_keep(seed_4, shape, rate):
  """Boolean keep-mask with P(keep) = 1 - rate: one uint32 per element from XLA's RngBitGenerator seeded with
  `seed_4` (uint32[4]), compared with a threshold (no float conversion).

  On CPU the generator runs ThreeFry, which XLA's CPU backend generates faster than its default (Philox) or
  jax.random's threefry (docs/performance.md). Other backends keep their default, the fast one on their hardware.
  """
  algorithm = lax.RandomAlgorithm.RNG_THREE_FRY if parallel.platform() == 'cpu' else lax.RandomAlgorithm.RNG_DEFAULT
  _, bits = lax.rng_bit_generator(seed_4, shape, jnp.uint32, algorithm=algorithm)
  return bits >= jnp.uint32(min(int(rate * 2.0**32), 2**32 - 1))


def softcap(x, cap: float):
  """cap * tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2's soft-cap); cap 0 = x unchanged."""
  return cap * jnp.tanh(x / cap) if cap else x


def _softmax_dropout(s, bias, dropout, dropout_seed, cap=0.0):
  p = jax.nn.softmax(softcap(s, cap) + bias, axis=-1)
  if dropout > 0:
    p = jnp.where(dropout_keep(dropout_seed, p.shape, dropout), p * (1.0 / (1.0 - dropout)), 0.0)
  return p


def chunk_for(length: int, setting: int) -> int:
  """Query-chunk length for causal chunks (module docstring). setting > 0: that length; 0: off; -1 (auto): on CPU,
  length / 4 clamped to [32, 128] (at most 16 chunks) from sequences of 128 up, the best of the lengths measured
  there; off elsewhere, where fused kernels ('cudnn') or the MXU's wide tiles change the trade."""
  if setting >= 0:
    return setting if 0 < setting < length else 0
  if parallel.platform() != 'cpu' or length < 128:
    return 0
  return max(min(128, max(32, length // 4)), -(-length // 16))


def _xla(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, mask, dropout, dropout_rng, causal_chunk, cap=0.0, scale=None):
  B, L, H, K = q_BxLxHxK.shape
  q_BxLxHxK = q_BxLxHxK * jnp.asarray(K**-0.5 if scale is None else scale, q_BxLxHxK.dtype)
  bias = bias_from_mask(mask)  # B' x 1 x 1 x L x T (B' = 1 or B)
  chunk = causal_chunk if 0 < causal_chunk < L and k_BxNxTxK.shape[2] == L else L
  starts = range(0, L, chunk)
  seeds = jax.random.bits(dropout_rng, (len(starts), 4), jnp.uint32) if dropout > 0 else [None] * len(starts)
  outs = []
  for q0, seed in zip(starts, seeds):
    q1 = min(q0 + chunk, L)
    t1 = q1 if chunk < L else k_BxNxTxK.shape[2]  # keys after the chunk's last query are hidden from all of it
    outs.append(
      _block(q_BxLxHxK[:, q0:q1], k_BxNxTxK[:, :, :t1], v_BxNxTxK[:, :, :t1], bias[..., q0:q1, :t1], dropout, seed, cap)
    )
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _block(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, bias, dropout, dropout_seed, cap=0.0):
  """Scaled queries against keys and values under an additive bias: one softmax block (scores soft-capped at
  `cap` before the mask, as Gemma 2)."""
  B, L, H, K = q_BxLxHxK.shape
  N = k_BxNxTxK.shape[1]
  if N == H:  # multi-head: 4-D contractions; XLA's CPU backward of the 5-D form adds transposes and copies
    s_BxHxLxT = jnp.einsum('BLHK,BHTK->BHLT', q_BxLxHxK, k_BxNxTxK, preferred_element_type=jnp.float32)
    p_BxHxLxT = _softmax_dropout(s_BxHxLxT, bias[:, 0], dropout, dropout_seed, cap)
    return jnp.einsum('BHLT,BHTK->BLHK', p_BxHxLxT.astype(v_BxNxTxK.dtype), v_BxNxTxK)
  q_BxLxNxGxK = q_BxLxHxK.reshape(B, L, N, H // N, K)
  s_BxNxGxLxT = jnp.einsum('BLNGK,BNTK->BNGLT', q_BxLxNxGxK, k_BxNxTxK, preferred_element_type=jnp.float32)
  p_BxNxGxLxT = _softmax_dropout(s_BxNxGxLxT, bias, dropout, dropout_seed, cap)
  o_BxLxNxGxK = jnp.einsum('BNGLT,BNTK->BLNGK', p_BxNxGxLxT.astype(v_BxNxTxK.dtype), v_BxNxTxK)
  return o_BxLxNxGxK.reshape(B, L, H, K)


def _dot_product_attention(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, mask, causal, implementation, scale=None):
  # is_causal lets cuDNN skip the blocks above the diagonal and read no mask at all; a mask (segments, cache slots)
  # stays B' x 1 x L x T: broadcast over heads by the kernel, never materialised per head.
  mask_Bx1xLxT = None if mask is None else mask.reshape(mask.shape[0], 1, *mask.shape[-2:])
  return jax.nn.dot_product_attention(
    q_BxLxHxK,
    k_BxNxTxK.transpose(0, 2, 1, 3),
    v_BxNxTxK.transpose(0, 2, 1, 3),
    mask=mask_Bx1xLxT,
    is_causal=causal,
    implementation=implementation,
    scale=scale,
  )


def resolve(
  impl: str,
  dtype,
  dropout: float,
  causal: bool,
  length: int,
  boolean_mask: bool = False,
  cap: float = 0.0,
  windowed: bool = False,
) -> str:
  """'auto' picks cuDNN on GPU, splash on TPU, for causal self-attention (training, eval) where they apply; splash
  reads segment ids, so a boolean mask keeps 'auto' on 'xla' there, and cuDNN cannot soft-cap scores (`cap`), so a
  cap keeps 'auto' on 'xla' on GPU. Neither is given a sliding window here (`windowed`): 'xla' then. Decoding over a KV cache stays on 'xla' (as 'splash' does): a step of one
  query gains little from a flash kernel, and that path was never run on a GPU here."""
  if impl == 'splash' and not causal:
    return 'xla'
  if impl != 'auto':
    return impl
  backend = parallel.platform()
  if windowed:
    return 'xla'
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and dropout == 0 and causal and not cap:
    return 'cudnn'
  if backend == 'tpu' and dropout == 0 and causal and length % 128 == 0 and not boolean_mask:
    return 'splash'
  return 'xla'


def _splash_kernel(length: int, heads: int, grouped: bool, cap: float = 0.0):
  """The splash kernel for one sequence: causal masks for `heads` query heads, each reading its own kv head, or
  (grouped) all reading one kv head. Built on every trace: its block tables become constants of the program being
  traced (a kernel kept across traces would carry the first trace's mesh); the costly mask analysis behind them
  is cached by the splash module itself."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  if length % 128:
    raise ValueError(
      f"attention='splash' needs a sequence length that is a multiple of 128 (the kernel's tiles), "
      f"got {length}; change model.max_len or use model.attention='xla'"
    )
  block = next(b for b in (512, 256, 128) if length % b == 0)
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
  make = sk.make_splash_mqa if grouped else sk.make_splash_mha
  platform = parallel.platform()
  interpret = platform != 'tpu'
  if interpret:
    _warn_interpreted(platform)
  kernel = make(
    mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret, attn_logits_soft_cap=cap or None
  )
  return kernel, sk.SegmentIds


@functools.lru_cache(maxsize=1)
def _warn_interpreted(platform: str):
  warnings.warn(
    f"attention='splash' on {platform}: the TPU kernel runs in Pallas's interpreter, "
    "exact but orders of magnitude slower; use model.attention='auto' or 'xla' off TPU",
    stacklevel=2,
  )


def _splash(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, segment_ids_BxL, cap=0.0, scale=None):
  B, L, H, K = q_BxLxHxK.shape
  N = k_BxNxTxK.shape[1]
  # Queries grouped by kv head (B x L x N x G x K): a mesh splits kv heads and their query heads alike, or, when
  # it cannot split the kv heads (MQA), each group's query heads, every shard holding all kv heads.
  scale = K**-0.5 if scale is None else scale
  q_BxLxNxGxK = (q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype)).reshape(B, L, N, H // N, K)

  def per_shard(q_BxLxNxGxK, k_BxNxTxK, v_BxNxTxK, segment_ids_BxL):
    n, G = q_BxLxNxGxK.shape[2:4]
    kernel, SegmentIds = _splash_kernel(L, G if G > 1 else n, G > 1, cap)
    q_BxNxGxLxK = q_BxLxNxGxK.transpose(0, 2, 3, 1, 4)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=None if s is None else SegmentIds(q=s, kv=s))
    if G > 1:  # one grouped (MQA) kernel per kv head: G x L x K queries against T x K keys
      o_BxNxGxLxK = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(q_BxNxGxLxK, k_BxNxTxK, v_BxNxTxK, segment_ids_BxL)
    else:
      o_BxNxGxLxK = jax.vmap(one)(q_BxNxGxLxK[:, :, 0], k_BxNxTxK, v_BxNxTxK, segment_ids_BxL)[:, :, None]
    return o_BxNxGxLxK.transpose(0, 3, 1, 2, 4)

  o_BxLxNxGxK = parallel.shard_map_logical(
    per_shard,
    (q_BxLxNxGxK, k_BxNxTxK, v_BxNxTxK, segment_ids_BxL),
    # Lengths stay whole whatever the rules say: the kernel is built for the whole sequence.
    (
      ('batch', None, 'kv_heads', 'heads', 'head_dim'),
      ('batch', 'kv_heads', None, 'head_dim'),
      ('batch', 'kv_heads', None, 'head_dim'),
      ('batch', None),
    ),
  )
  return o_BxLxNxGxK.reshape(B, L, H, K)


def attend(
  q_BxLxHxK,
  k_BxNxTxK,
  v_BxNxTxK,
  mask,
  *,
  impl='xla',
  dropout=0.0,
  dropout_rng=None,
  causal=False,
  causal_chunk=0,
  softcap=0.0,
  scale=None,
  window=0,
):
  """Attention output o_BxLxHxK.

  causal=True asserts a sequence attending to itself, no cache: query i and key i are the same slot, so the mask
  hides every key after its query -- fused kernels then skip the blocks above the diagonal, and causal_chunk > 0
  ('xla') splits the queries into chunks that do the same (module docstring). `mask` is then None (one sequence
  per row) or the int32 segment ids B x L of packed rows (0 = padding), as the model passes them: each kernel
  builds its own mask, and 'splash' reads the ids as they are. make_mask's boolean mask is accepted too, by every
  kernel but 'splash'. Without causal, `mask` is make_mask's boolean mask (decoding over a cache).
  dropout_rng: a JAX key, needed when dropout > 0. softcap > 0: scores become softcap * tanh(scores / softcap)
  before the mask ('xla' and 'splash' only; config.UNCAPPED_ATTENTION are refused). scale: what q.k is multiplied
  by (None: 1/sqrt(K)). window > 0 (causal only): each query also sees only its last `window` slots (make_mask);
  'xla' and 'dot_product_attention' only (config.WINDOWLESS_ATTENTION are refused)."""
  segment_ids_BxL = None
  if mask is not None and mask.dtype != jnp.bool_:
    if not causal:
      raise ValueError('attend: segment ids as the mask need causal=True; pass make_mask(...) otherwise')
    segment_ids_BxL = mask
  if not causal and (mask is None or causal_chunk > 0):
    raise ValueError('attend: mask=None (the causal mask alone) and causal_chunk > 0 need causal=True')
  boolean_mask = mask is not None and segment_ids_BxL is None
  windowed = not _no_window(window)
  if windowed and not causal:
    raise ValueError('attend: a window needs causal=True; over a cache, put the window in make_mask(...)')
  impl = resolve(impl, q_BxLxHxK.dtype, dropout, causal, q_BxLxHxK.shape[1], boolean_mask, softcap, windowed)
  if windowed and impl in config_lib.WINDOWLESS_ATTENTION:
    raise ValueError(f"attention={impl!r} has no sliding window here; use model.attention='xla' or 'auto'")
  if softcap and impl in config_lib.UNCAPPED_ATTENTION:
    raise ValueError(f"attention={impl!r} cannot soft-cap attention scores; use model.attention='xla' or 'auto'")
  if impl == 'splash' and boolean_mask:
    raise ValueError("attention='splash' reads segment ids, not a boolean mask: pass the B x L segment ids")
  if dropout > 0 and impl != 'xla':
    raise ValueError(f"attention={impl!r} has no attention dropout; set model.dropout=0 or model.attention='xla'")
  if impl == 'splash':
    return _splash(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, segment_ids_BxL, softcap, scale)
  slots_L = jnp.arange(q_BxLxHxK.shape[1], dtype=jnp.int32)
  if segment_ids_BxL is not None:
    mask = make_mask(slots_L, slots_L, segment_ids_BxL, segment_ids_BxL, window)
  elif mask is None and (impl == 'xla' or windowed):  # fused kernels get is_causal and no mask array if they can
    mask = make_mask(slots_L, slots_L, window=window)
  elif windowed:
    mask = mask & make_mask(slots_L, slots_L, window=window)
  if impl == 'xla':
    return _xla(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, mask, dropout, dropout_rng, causal_chunk, softcap, scale)
  kernel = 'cudnn' if impl == 'cudnn' else 'xla'
  return _dot_product_attention(q_BxLxHxK, k_BxNxTxK, v_BxNxTxK, mask, causal, kernel, scale)
