"""A tiny character model for tests and smoke runs: trains in seconds on any CPU.

Run:   lmjax train --config=configs/tiny.py --workdir=/tmp/tiny --config.data.manual_dir=../shared/data/tinyshakespeare
Takes: ~10 s on a 2-core CPU (mostly start-up and compilation); loss falls from ~4.2 to ~3.0 in 60 steps.
Variants: `configs/tiny.py:llama` swaps in RMSNorm, RoPE, SwiGLU, grouped-query attention and no biases.
"""

from lmjax.config import default_config


def get_config(variant=''):
  c = default_config()
  c.model.n_layers, c.model.n_heads, c.model.d_model = 2, 4, 32
  c.model.max_len = 32
  c.train.batch_size = 8
  c.train.steps = 60
  c.train.log_every = 10
  c.train.eval_every = 30
  c.train.eval_batch_size = 32
  c.train.eval_max_batches = 4
  c.train.checkpoint_every = 30
  c.optimizer.lr, c.optimizer.min_lr = 3e-3, 3e-4
  c.optimizer.warmup_steps = 10
  if variant == 'llama':
    c.model.norm, c.model.positions, c.model.mlp = 'rmsnorm', 'rope', 'swiglu'
    c.model.n_kv_heads, c.model.use_bias, c.model.tied_embeddings = 2, False, False
  elif variant:
    raise ValueError(f"configs/tiny.py has variants '' and 'llama', not {variant!r}")
  return c
