"""nanoGPT's GPU recipe: a 10.7M-parameter character-level GPT on Tiny Shakespeare (6 layers, 6 heads, d 384).

Run:   lmjax train --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char \
         --config.data.manual_dir=../shared/data/tinyshakespeare
Takes: minutes on one GPU; far too slow for a 2-core CPU (see README's benchmark table for its step time there).
Reaches: val loss ~1.47 at step 5000 in nanoGPT's run of this recipe (not yet reproduced by lmjax on a GPU).
"""
import os

from lmjax import config as config_lib


def get_config():
  # nanoGPT's two recipes share the optimizer (AdamW 1e-3 -> 1e-4, warmup 100, beta2 0.99, wd 0.1, clip 1.0).
  c = config_lib.load(os.path.join(os.path.dirname(__file__), 'shakespeare_char_cpu.py'))
  c.model.n_layers, c.model.n_heads, c.model.d_model = 6, 6, 384
  c.model.max_len = 256
  c.model.dropout = 0.2
  c.train.batch_size = 64
  c.train.steps = 5000
  c.train.log_every = 10
  return c
