"""Beam search over the sampler's compiled decode loop (lmjax/sample.py builds the cache and the loop).

Rows are B groups of W beams. The W copies of a prompt start identical, so all but one beam start at -inf and the
first step expands one beam only. A step proposes 2W continuations: those ending in EOS enter the finished pool
(scored with the length penalty of Google's NMT / Flax's beam search), the best W others stay live. The loop stops
early once no live beam can beat the worst finished one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity" (also the sampler's): a masked candidate must never make a row NaN


def length_penalty_factor(length, alpha):
  """Google NMT / Flax beam search: a finished beam scores log_prob / ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def search(
  logits_RxV,
  cache,
  decode_step,
  run_stages,
  *,
  beam_size: int,
  eos_id,
  pad_id: int,
  max_new: int,
  alpha,
  batch_axis: int,
):
  """Beam search from the prefill's logits_RxV and cache. decode_step(t, last_R, cache) -> (logits_RxV, cache)
  feeds step t-1's tokens; run_stages(carry, cont, body) runs the staged while loops (the cache is carry[-1]).
  Returns (tokens_RxN, scores_R): each group's beams best first, scored by length-penalised log-probability."""
  W = beam_size
  R, V = logits_RxV.shape
  B = R // W

  def beam_step(logits_RxV, t, beams):
    live_BxWxN, live_lp_BxW, fin_BxWxN, fin_score_BxW = beams
    cand_BxWxV = live_lp_BxW[:, :, None] + jax.nn.log_softmax(logits_RxV).reshape(B, W, V)
    lp_Bx2W, flat_Bx2W = jax.lax.top_k(cand_BxWxV.reshape(B, W * V), 2 * W)
    parent_Bx2W, tok_Bx2W = flat_Bx2W // V, (flat_Bx2W % V).astype(jnp.int32)
    seqs_Bx2WxN = jnp.take_along_axis(live_BxWxN, parent_Bx2W[:, :, None], axis=1)
    seqs_Bx2WxN = jax.lax.dynamic_update_slice(seqs_Bx2WxN, tok_Bx2W[:, :, None], (0, 0, t))
    eos_Bx2W = (tok_Bx2W == eos_id) if eos_id is not None else jnp.zeros_like(tok_Bx2W, bool)
    live_lp_BxW, keep_BxW = jax.lax.top_k(jnp.where(eos_Bx2W, NEG, lp_Bx2W), W)
    live_BxWxN = jnp.take_along_axis(seqs_Bx2WxN, keep_BxW[:, :, None], axis=1)
    parent_BxW = jnp.take_along_axis(parent_Bx2W, keep_BxW, axis=1)
    new_score_Bx2W = jnp.where(eos_Bx2W, lp_Bx2W / length_penalty_factor(t + 1, alpha), NEG)
    fin_score_BxW, best_BxW = jax.lax.top_k(jnp.concatenate([fin_score_BxW, new_score_Bx2W], axis=1), W)
    fin_BxWxN = jnp.take_along_axis(jnp.concatenate([fin_BxWxN, seqs_Bx2WxN], axis=1), best_BxW[:, :, None], axis=1)
    rows_R = (jnp.arange(B)[:, None] * W + parent_BxW).reshape(R)
    return (live_BxWxN, live_lp_BxW, fin_BxWxN, fin_score_BxW), rows_R

  seqs_BxWxN = jnp.full((B, W, max_new), pad_id, jnp.int32)
  first_lp_BxW = jnp.broadcast_to(jnp.where(jnp.arange(W) == 0, 0.0, NEG), (B, W))
  beams, rows_R = beam_step(logits_RxV, 0, (seqs_BxWxN, first_lp_BxW, seqs_BxWxN, jnp.full((B, W), NEG)))
  cache = jax.tree.map(lambda x: jnp.take(x, rows_R, axis=batch_axis), cache)

  def beam_body(c):
    t, beams, cache = c
    logits_RxV, cache = decode_step(t, beams[0][:, :, t - 1].reshape(R), cache)
    beams, rows_R = beam_step(logits_RxV, t, beams)
    return t + 1, beams, jax.tree.map(lambda x: jnp.take(x, rows_R, axis=batch_axis), cache)

  def beam_cont(c):
    """Stops early once no live beam can still beat the worst finished one: log-probs only fall, so the best a
    live beam can reach is its log-prob now over the largest length penalty left."""
    t, (_, live_lp_BxW, _, fin_score_BxW), _ = c
    best_live_B = live_lp_BxW[:, 0] / jnp.maximum(
      length_penalty_factor(t, alpha), length_penalty_factor(max_new, alpha)
    )
    return (t < max_new) & ~jnp.all(best_live_B < fin_score_BxW[:, -1])

  t, (live_BxWxN, live_lp_BxW, fin_BxWxN, fin_score_BxW), _ = run_stages(
    (jnp.int32(1), beams, cache), beam_cont, beam_body
  )
  # Beams still live at the end compete with the finished ones under the same length penalty.
  live_score_BxW = live_lp_BxW / length_penalty_factor(t, alpha)
  score_BxW, best_BxW = jax.lax.top_k(jnp.concatenate([fin_score_BxW, live_score_BxW], axis=1), W)
  out_BxWxN = jnp.take_along_axis(jnp.concatenate([fin_BxWxN, live_BxWxN], axis=1), best_BxW[:, :, None], axis=1)
  return out_BxWxN.reshape(R, max_new), score_BxW.reshape(R)
