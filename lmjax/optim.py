"""Optimizers from the config: Optax AdamW (default), Lion, Adafactor or Muon; warmup + cosine; clipping.

Weight decay touches weight matrices only: every `*_kernel` (attention and MLP projections) and an untied
`lm_head`; never norms or biases; the token and position embeddings only with optimizer.decay_embeddings.
"""

from __future__ import annotations

import jax
import optax
from optax import contrib

from lmjax.errors import ConfigError
from lmjax.config import OPTIMIZERS  # the names config.validate accepts


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path[-1:], simple=True)


def decay_mask(params, decay_embeddings: bool = False):
  """True for the leaves weight decay applies to (see module docstring)."""

  def decays(path, _):
    name = _leaf_name(path)
    return name.endswith('_kernel') or name == 'lm_head' or (decay_embeddings and name in ('embed', 'pos_embed'))

  return jax.tree_util.tree_map_with_path(decays, params)


# Muon orthogonalises each projection as a matrix (reduction axes -> output axes); other axes are batch axes.
# Leaves not listed (embeddings, norms, biases) get Muon's built-in Adam.
_MUON_DIMS = {
  'q_kernel': ((0,), (1, 2)),  # D -> H x K
  'kv_kernel': ((0,), (2, 3)),  # D -> N x K, keys and values separately
  'o_kernel': ((0, 1), (2,)),  # H x K -> D
  'up_kernel': ((0,), (1,)),
  'gate_kernel': ((0,), (1,)),
  'down_kernel': ((0,), (1,)),
  'lm_head': ((0,), (1,)),
}


def _muon_dims(params):
  def dims(path, x):
    spec = _MUON_DIMS.get(_leaf_name(path))
    if spec is None:
      return None
    shift = x.ndim - (len(spec[0]) + len(spec[1]) + (1 if _leaf_name(path) == 'kv_kernel' else 0))
    return contrib.MuonDimensionNumbers(tuple(a + shift for a in spec[0]), tuple(a + shift for a in spec[1]))

  return jax.tree_util.tree_map_with_path(dims, params)


def schedule(oc, total_steps: int):
  """Linear warmup from 0 to lr, then cosine down to min_lr at step decay_steps (default: the last step)."""
  end = max(oc.decay_steps or total_steps, oc.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(0.0, oc.lr, oc.warmup_steps, end, oc.min_lr)


def make(oc, total_steps: int):
  """Returns (optax transform, lr schedule). Clipping happens before the optimizer sees the gradient."""
  lr = schedule(oc, total_steps)
  mask = lambda p: decay_mask(p, oc.decay_embeddings)
  if oc.name == 'adamw':
    tx = optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=mask)
  elif oc.name == 'lion':
    tx = optax.lion(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=mask)
  elif oc.name == 'adafactor':
    tx = optax.adafactor(lr, weight_decay_rate=oc.weight_decay or None, weight_decay_mask=mask)
  elif oc.name == 'muon':
    tx = contrib.muon(
      lr,
      beta=oc.b1,
      eps=oc.eps,
      weight_decay=oc.weight_decay,
      weight_decay_mask=mask,
      adam_b1=oc.b1,
      adam_b2=oc.b2,
      muon_weight_dimension_numbers=_muon_dims,
    )
  else:
    raise ConfigError(f'optimizer.name must be one of {", ".join(OPTIMIZERS)}; got {oc.name!r}')
  if oc.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx)
  return tx, lr
