"""The pure, jitted functions of training: the train state, the loss, one (or S, steps per call) optimizer steps, the eval step.

Nothing here does I/O or knows about meshes; lmjax/engine.py jits these with shardings, lmjax/train.py runs them.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


def loss_terms(params, model, batch, *, train=False, rng=None, z_loss=False):
  """(summed token NLL, number of target tokens) in float32. `weights` (if present) masks padding. `z_loss`: a
  third term, the summed log Z^2 (log of the softmax normaliser, squared; PaLM's z-loss pulls it towards 0)."""
  logits_BxLxV = model.apply(
    {'params': params},
    batch['inputs'],
    batch.get('positions'),
    batch.get('segment_ids'),
    train=train,
    rngs={'dropout': rng} if rng is not None else None,
  )
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch['targets'][..., None], axis=-1)[..., 0]
  nll_BxL = logz_BxL - target_logit_BxL
  if 'weights' in batch:
    terms = jnp.sum(nll_BxL * batch['weights']), jnp.sum(batch['weights'])
    z_BxL = jnp.square(logz_BxL) * batch['weights']
  else:
    terms = jnp.sum(nll_BxL), jnp.float32(nll_BxL.size)
    z_BxL = jnp.square(logz_BxL)
  return (*terms, jnp.sum(z_BxL)) if z_loss else terms


def train_step(
  state: TrainState,
  batch,
  rng,
  *,
  model,
  tx,
  grad_accum: int = 1,
  skip_nonfinite: bool = False,
  z_loss: float = 0.0,
  to_model=None,
):
  """One optimizer step on one global batch -> (new state, metrics). Dropout keys derive from (rng, step), so a
  resumed run draws exactly the masks the uninterrupted run drew. `z_loss` > 0 adds z_loss * mean(log Z^2) to the
  loss the gradient follows (metrics: train_loss stays the cross-entropy, z_loss is the term added).

  metrics['finite'] says the loss, the gradient norm and every updated parameter are finite: the loop checks it
  before it saves a state, so a checkpoint never holds a non-finite parameter. `skip_nonfinite`: such an update is
  dropped instead (parameters and optimizer state stay as they were; the step still counts).

  `to_model(params, rng)`: the model's parameters from the trained ones (LoRA: base + adapters, lmjax/lora.py);
  None = the trained parameters are the model's."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, micro, micro_rng):
    if to_model is not None:
      params = to_model(params, jax.random.fold_in(micro_rng, 1))
    terms = loss_terms(params, model, micro, train=True, rng=micro_rng, z_loss=bool(z_loss))
    total, count = terms[:2]
    return (total + z_loss * terms[2] if z_loss else total) / count, terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (_, terms), grads = grad_fn(state.params, batch, rng)
  else:
    # Micro-batches in a scan: gradients of per-micro-batch means, averaged (equal-sized micro-batches).
    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      micro, i = xs
      (_, t), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (g, *t)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params),) + (jnp.float32(0),) * (3 if z_loss else 2)
    (grads, *terms), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(grad_accum)))
    grads = jax.tree.map(lambda g: g / grad_accum, grads)
  total, count = terms[:2]

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)  # optax.apply_updates, minus its dtype casts
  loss, grad_norm = total / count, _global_norm(grads)
  # The parameters after the update are checked, not just the loss before it: a finite loss can still produce a
  # non-finite update, and the state after it is the one a checkpoint would hold.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {'train_loss': loss, 'grad_norm': grad_norm, 'finite': finite}
  if z_loss:
    metrics['z_loss'] = z_loss * terms[2] / count
  return new_state, metrics


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_steps(state, batches_SxBxL, rng, **kw):
  """S optimizer steps in one call (lax.scan over S stacked batches): the per-call cost of launching an executable
  is paid once per S steps. Metrics come back stacked, one value per step."""
  return jax.lax.scan(lambda s, b: train_step(s, b, rng, **kw), state, batches_SxBxL)


def lora_train_steps(state, batches_SxBxL, rng, base, *, merge, **kw):
  """train_steps of LoRA adapters (state.params) over the frozen `base`: `merge(base, adapters, rng)` gives the
  model's parameters inside the step, so gradients and optimizer state are the adapters' alone."""
  return train_steps(state, batches_SxBxL, rng, to_model=lambda a, key: merge(base, a, key), **kw)


def eval_step(params, batch, *, model):
  return loss_terms(params, model, batch)
