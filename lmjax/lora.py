"""LoRA: low-rank adapters trained over a frozen base (Hu et al. 2021), as the `lora` config section asks.

Each targeted projection W (in x out, lmjax's kernel layout) gets A (in x r, small random) and B (r x out, zeros),
and the model runs with W + (alpha / r) * A B. The merge happens inside the jitted train step (lmjax/steps.py
`to_model`), so the model code is the full-parameter one and the gradient reaches A and B only: the base is a
frozen input of the step, never in the optimizer state or a checkpoint. A checkpoint holds the adapters and
records a fingerprint of the base they belong to (`fingerprint`), checked on resume and on load.

Targets, by lmjax's names (GPT-2's fused c_attn holds q, k and v; its c_fc is up and its mlp.c_proj down):
  q, k, v, o       attention: q_kernel, kv_kernel's keys and values, o_kernel
  gate, up, down   the MLP (gate only in a SwiGLU MLP, a Llama's)

Adapters: {'block_i': {TARGET: {'a': in x r, 'b': r x out}}}. lora.dropout drops input features of the adapter
path; the adapters being merged into the kernel, one mask per step and layer serves every token (PEFT draws one
per token).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import LORA_TARGETS, ModelConfig
from lmjax.errors import ConfigError


def enabled(config) -> bool:
  return config.get('lora', {}).get('rank', 0) > 0


def targets(config) -> tuple[str, ...]:
  return tuple(config.lora.targets)


def scale(config) -> float:
  return float(config.lora.alpha) / int(config.lora.rank)


def check_model(config, cfg: ModelConfig) -> None:
  """A ConfigError for a target this model has no projection for (gate in a GELU MLP), or a layout LoRA does not
  cover (scanned layers)."""
  missing = [t for t in targets(config) if t == 'gate' and cfg.mlp != 'swiglu']
  if missing:
    raise ConfigError(
      f"lora.targets names 'gate', which matches nothing in this model (model.mlp={cfg.mlp!r} has no gate "
      f'projection; SwiGLU models such as Llama have one); remove it from lora.targets'
    )
  if cfg.scan_layers:
    raise ConfigError('lora works on unscanned layers: set model.scan_layers=False')


def io_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
  """(in, out) of a target's kernel viewed as a matrix."""
  D, HK, NK, F = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.ff_dim
  return {'q': (D, HK), 'k': (D, NK), 'v': (D, NK), 'o': (HK, D), 'gate': (D, F), 'up': (D, F), 'down': (F, D)}[target]


def shapes(cfg: ModelConfig, config) -> dict:
  """{'block_i': {target: {'a': (in, r), 'b': (r, out)}}} of this model and config."""
  r = int(config.lora.rank)
  out = {}
  for i in range(cfg.n_layers):
    out[f'block_{i}'] = {}
    for t in targets(config):
      d_in, d_out = io_dims(cfg, t)
      out[f'block_{i}'][t] = {'a': (d_in, r), 'b': (r, d_out)}
  return out


def abstract(cfg: ModelConfig, config, dtype=jnp.float32) -> dict:
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, dtype), shapes(cfg, config), is_leaf=lambda x: isinstance(x, tuple)
  )


def init(rng, cfg: ModelConfig, config, dtype=jnp.float32) -> dict:
  """Fresh adapters: A uniform in +-1/sqrt(in) (PEFT's kaiming-uniform bound), B zeros, so the model starts as the
  base exactly."""
  tree = shapes(cfg, config)
  out = {}
  for i, (blk, per) in enumerate(tree.items()):
    out[blk] = {}
    for j, (t, s) in enumerate(per.items()):
      key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
      bound = 1.0 / np.sqrt(s['a'][0])
      out[blk][t] = {
        'a': jax.random.uniform(key, s['a'], dtype, -bound, bound),
        'b': jnp.zeros(s['b'], dtype),
      }
  return out


def _add(kernel, target: str, delta_IxO, cfg: ModelConfig):
  """`kernel` (lmjax's stored shape) plus a target's delta given as an in x out matrix."""
  kernel = jnp.asarray(kernel)
  if target in ('k', 'v'):
    which = 0 if target == 'k' else 1
    return kernel.at[:, which].add(delta_IxO.reshape(kernel.shape[0], *kernel.shape[2:]).astype(kernel.dtype))
  return kernel + delta_IxO.reshape(kernel.shape).astype(kernel.dtype)


_WHERE = {
  'q': ('attn', 'q_kernel'),
  'k': ('attn', 'kv_kernel'),
  'v': ('attn', 'kv_kernel'),
  'o': ('attn', 'o_kernel'),
  'gate': ('mlp', 'gate_kernel'),
  'up': ('mlp', 'up_kernel'),
  'down': ('mlp', 'down_kernel'),
}
assert tuple(_WHERE) == LORA_TARGETS


def merge(base, adapters, cfg: ModelConfig, scale_: float, rng=None, dropout: float = 0.0):
  """The full parameters base + scale * A B at every adapted kernel (pure; jitted inside the train step). `rng`
  with `dropout` > 0: input features of each adapter dropped (module docstring)."""
  out = dict(base)
  for i, (blk, per) in enumerate(adapters.items()):
    block = {k: dict(v) if isinstance(v, dict) else v for k, v in base[blk].items()}
    for j, (t, ab) in enumerate(per.items()):
      a_IxR = ab['a']
      if rng is not None and dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(rng, i), j), 1.0 - dropout, a_IxR.shape[:1])
        a_IxR = a_IxR * (keep[:, None] / (1.0 - dropout)).astype(a_IxR.dtype)
      delta_IxO = scale_ * (a_IxR.astype(jnp.float32) @ ab['b'].astype(jnp.float32))
      part, name = _WHERE[t]
      block[part][name] = _add(block[part][name], t, delta_IxO, cfg)
    out[blk] = block
  return out


def merge_fn(config, cfg: ModelConfig):
  """(base, adapters[, rng]) -> full parameters, with this config's scale and dropout."""
  s, p = scale(config), float(config.lora.dropout)
  return lambda base, adapters, rng=None: merge(base, adapters, cfg, s, rng, p)


def count(adapters) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------------- the base's identity


def fingerprint(ref: str, base) -> dict:
  """What identifies the base adapters were trained over: its reference (train.init_from), a digest of every
  parameter's path and shape, and each parameter's sum and sum of magnitudes (cheap on device; other weights
  differ in them, while a different mesh only changes their rounding)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(base)
  sums = jax.device_get([(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))) for _, x in flat])
  layout = ';'.join(f'{jax.tree_util.keystr(p)}:{tuple(x.shape)}' for p, x in flat)
  return {
    'ref': ref,
    'shapes': hashlib.sha256(layout.encode()).hexdigest()[:16],
    'sums': [[float(s), float(a)] for s, a in sums],
  }


def same_base(recorded: dict, have: dict) -> bool:
  if recorded.get('shapes') != have['shapes'] or len(recorded.get('sums', ())) != len(have['sums']):
    return False
  rec_Px2, now_Px2 = np.asarray(recorded['sums'], np.float64), np.asarray(have['sums'], np.float64)
  # float32 sums over another mesh round differently; other weights move them far more than 1e-4 of the magnitudes
  return bool(np.all(np.abs(rec_Px2 - now_Px2) <= 1e-4 * np.maximum(now_Px2[:, 1:], 1e-6)))


def check_base(recorded: dict | None, have: dict, where: str) -> None:
  """A ConfigError (not a damaged checkpoint: nothing is set aside) when the adapters in `where` were trained over
  another base than `have`, naming both."""
  if recorded is None or same_base(recorded, have):
    return
  raise ConfigError(
    f'the adapters in {where} belong to the base {recorded.get("ref")!r}, but the base given, {have["ref"]!r}, '
    'holds other weights (their shapes or sums differ); give the base they were trained over as train.init_from, '
    'or train new adapters in a new --workdir'
  )


def describe(config) -> str:
  """'LoRA r=8 alpha=16 on q,k,v,o' for start-up lines."""
  lc = config.lora
  return f'LoRA r={lc.rank} alpha={lc.alpha:g} on {",".join(lc.targets)}'
