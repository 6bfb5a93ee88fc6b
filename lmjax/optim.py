"""Optimizers from the config: Optax AdamW (default), Lion, Adafactor or Muon; the learning-rate schedule; clipping.

Schedules (optimizer.schedule), each after optimizer.warmup_steps of linear warmup from 0 to optimizer.lr:
  cosine        down to min_lr at decay_steps (default: the last step); the default
  linear        down to min_lr at decay_steps (default: the last step), then min_lr
  constant      lr
  inverse_sqrt  lr * sqrt(warmup_steps / step) (the original Transformer's), from the end of warmup
  wsd           warmup-stable-decay: lr until the last cooldown_steps steps before decay_steps (default: the last
                step), then down to min_lr along cooldown_shape (linear, cosine or 1-sqrt). In the stable phase the
                learning rate is exactly lr, whatever the run's length: a run branched from it (train.branch_from)
                with a cooldown of its own has followed the same schedule until the branch point.

Weight decay touches weight matrices only: every `*_kernel` (attention and MLP projections) and an untied
`lm_head`; never norms or biases; the token and position embeddings only with optimizer.decay_embeddings.
optimizer.lr_multipliers and wd_multipliers change both per parameter group (`param_group`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from lmjax.errors import ConfigError
from lmjax.config import OPTIMIZERS, PARAM_GROUPS, SCHEDULES, COOLDOWN_SHAPES  # the names config.validate accepts


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path[-1:], simple=True)


def decay_mask(params, decay_embeddings: bool = False):
  """True for the leaves weight decay applies to (see module docstring)."""

  def decays(path, _):
    name = _leaf_name(path)
    return name.endswith('_kernel') or name == 'lm_head' or (decay_embeddings and name in ('embed', 'pos_embed'))

  return jax.tree_util.tree_map_with_path(decays, params)


_GROUP_OF_LEAF = {
  'embed': 'embeddings',
  'pos_embed': 'embeddings',
  'lm_head': 'head',
  'scale': 'norms',  # every Norm's (ln1, ln2, ln_f, q_norm, k_norm)
  'bias': 'norms',  # a LayerNorm's; projections' biases are NAME_bias
  'q_kernel': 'attention',
  'kv_kernel': 'attention',
  'o_kernel': 'attention',
  'up_kernel': 'mlp',
  'gate_kernel': 'mlp',
  'down_kernel': 'mlp',
}


def param_group(path) -> str:
  """The group (config.PARAM_GROUPS) of the parameter at `path`, from its leaf name (the same with scanned layers)."""
  name = _leaf_name(path)
  return 'biases' if name.endswith('_bias') else _GROUP_OF_LEAF[name]


def check_groups(oc, params) -> None:
  """A ConfigError for a group optimizer.lr_multipliers or wd_multipliers names that has no parameter in this
  model (biases without model.use_bias, head with tied embeddings)."""
  present = set(jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), params)))
  for field in ('lr_multipliers', 'wd_multipliers'):
    empty = [g for g, _ in oc[field] if g not in present]
    if empty:
      raise ConfigError(
        f'optimizer.{field} names {", ".join(map(repr, empty))}, which matches no parameter of this model (its '
        f'groups: {", ".join(g for g in PARAM_GROUPS if g in present)}); remove it'
      )


def scale_by_group(multipliers) -> optax.GradientTransformation:
  """optimizer.lr_multipliers: each named group's updates times its multiplier, after the whole optimizer."""
  factor = dict(multipliers)

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      g = param_group(path)
      return u * jnp.asarray(factor[g], u.dtype) if g in factor else u

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def decay_by_group(oc) -> optax.GradientTransformation:
  """optimizer.wd_multipliers: decoupled weight decay, updates + rate * params, at weight_decay x multiplier for
  the named groups and the default mask's weight_decay or 0 for the others (optax.add_decayed_weights, per group)."""
  named = dict(oc.wd_multipliers)

  def update(updates, state, params):
    masked = decay_mask(params, oc.decay_embeddings)

    def one(path, u, p, decays):
      g = param_group(path)
      rate = oc.weight_decay * named[g] if g in named else (oc.weight_decay if decays else 0.0)
      return u + rate * p if rate else u

    return jax.tree_util.tree_map_with_path(one, updates, params, masked), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


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
  """The learning rate at each optimizer step (0-based), as the module docstring says."""
  end = max(oc.decay_steps or total_steps, oc.warmup_steps + 1)
  if oc.schedule == 'cosine':  # Optax's own, as before the other schedules: a default run is bitwise what it was
    return optax.warmup_cosine_decay_schedule(0.0, oc.lr, oc.warmup_steps, end, oc.min_lr)
  if oc.schedule not in SCHEDULES:
    raise ConfigError(f'optimizer.schedule must be one of {", ".join(SCHEDULES)}; got {oc.schedule!r}')
  warmup, peak, floor = oc.warmup_steps, jnp.float32(oc.lr), jnp.float32(oc.min_lr)

  def after_warmup(step):
    if oc.schedule == 'constant' or (oc.schedule == 'wsd' and not oc.cooldown_steps):
      return peak
    if oc.schedule == 'inverse_sqrt':
      return peak * jnp.sqrt(jnp.float32(max(warmup, 1)) / jnp.maximum(step, max(warmup, 1)))
    start, length = (end - oc.cooldown_steps, oc.cooldown_steps) if oc.schedule == 'wsd' else (warmup, end - warmup)
    t = jnp.clip((step - start) / length, 0.0, 1.0)
    shape = 'linear' if oc.schedule == 'linear' else oc.cooldown_shape
    left = {'linear': 1.0 - t, 'cosine': 0.5 * (1.0 + jnp.cos(jnp.pi * t)), '1-sqrt': 1.0 - jnp.sqrt(t)}[shape]
    return jnp.where(step < start, peak, floor + (peak - floor) * left)  # exactly lr before the decay starts

  def lr(count):
    step = jnp.asarray(count, jnp.float32)
    return jnp.where(step < warmup, peak * step / max(warmup, 1), after_warmup(step)).astype(jnp.float32)

  return lr


def schedule_points(oc, total_steps: int, points: int = 11) -> list[tuple[int, float]]:
  """(step, learning rate) at `points` steps spread evenly from 0 to total_steps - 1, and at the phase boundaries
  (end of warmup, start of a wsd cooldown): what `lmjax schedule` prints and plots."""
  lr = schedule(oc, total_steps)
  at = {round(i * (total_steps - 1) / max(points - 1, 1)) for i in range(points)}
  end = oc.decay_steps or total_steps
  at |= {s for s in (oc.warmup_steps, end - oc.cooldown_steps if oc.schedule == 'wsd' else -1) if 0 <= s < total_steps}
  at = sorted(at)
  return list(zip(at, map(float, lr(jnp.asarray(at, jnp.int32)))))  # every schedule here is elementwise in the step


class EmaState(NamedTuple):
  """train.ema_decay: the exponential moving average of the parameters after each update. It lives in the
  optimizer state, so a checkpoint saves it, a resume restores it bitwise, 'skip' drops it with the update, and
  its sharding is the parameters' (parallel.match_shardings)."""

  ema: Any


def ema(decay: float) -> optax.GradientTransformation:
  """The last link of the chain: passes the updates through and moves the average towards params + updates
  (the parameters this step leaves), starting from the parameters it is initialised with."""

  def init(params):
    return EmaState(jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    new = jax.tree.map(lambda e, p, u: decay * e + (1.0 - decay) * (p + u), state.ema, params, updates)
    return updates, EmaState(new)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """The EMA of the parameters an optimizer state made with train.ema_decay holds (None without one)."""
  found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
  return next((x.ema for x in found if isinstance(x, EmaState)), None)


def make(oc, total_steps: int, ema_decay: float = 0.0):
  """Returns (optax transform, lr schedule). Clipping happens before the optimizer sees the gradient; with
  `ema_decay`, `ema` comes last."""
  lr = schedule(oc, total_steps)
  mask = lambda p: decay_mask(p, oc.decay_embeddings)
  if oc.wd_multipliers and oc.name in ('adamw', 'lion'):  # optax's adamw and lion, with the decay link per group
    scale = optax.scale_by_adam(oc.b1, oc.b2, oc.eps) if oc.name == 'adamw' else optax.scale_by_lion(oc.b1, oc.b2)
    tx = optax.chain(scale, decay_by_group(oc), optax.scale_by_learning_rate(lr))
  elif oc.name == 'adamw':
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
  if oc.lr_multipliers:
    tx = optax.chain(tx, scale_by_group(oc.lr_multipliers))
  if oc.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx)
  if ema_decay:
    tx = optax.chain(tx, ema(ema_decay))
  return tx, lr
