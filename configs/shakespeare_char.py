"""nanoGPT's GPU recipe: a 10.7M-parameter character-level GPT on Tiny Shakespeare (6 layers, 6 heads, d 384).

Run:   lmjax train --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char \
         --config.data.manual_dir=../shared/data/tinyshakespeare [--config.model.dtype=bfloat16 on a GPU, as nanoGPT]
Takes: 96 s from command to end on one H100 with --config.model.dtype=bfloat16 (10.0 ms/step; 28 s compiling;
       2026-11-27); far too slow for a 2-core CPU (see README's benchmark table for its step time there).
Reaches: best val loss 1.4736 at step 2000 on that H100 run, 1.7448 at step 5000: the recipe overfits after step
       2000. nanoGPT reports 1.4697 as its best.
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
