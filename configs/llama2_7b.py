"""A Llama-2-7B-shaped GPT on C4 for a TPU slice: 32 layers, d_model 4096, 32 heads of 128 (multi-head, as the 7B
model), SwiGLU MLP 11008, RoPE, RMSNorm, no biases, untied 32k embeddings (~6.7B parameters), 4096-token packed rows,
float32 master weights and AdamW state sharded over the whole slice (fsdp), bf16 compute, layers scanned, splash
attention on TPU ('auto'), every block recomputed in the backward pass (remat 'full').

Check it fits before renting the slice (any host; docs/tpu.md has what was compiled, per chip and slice):
       lmjax plan --config=configs/llama2_7b.py --topology=v5p-64
       lmjax plan --config=configs/llama2_7b.py --topology=v5p-64 --fit     # the largest batch that fits
Prepare (once, a machine with network): tfds build c4/en --data_dir=gs://BUCKET/tfds --file_format=array_record
Run (on every host of the slice):
       lmjax train --config=configs/llama2_7b.py --workdir=gs://BUCKET/runs/llama2_7b \
         --config.data.data_dir=gs://BUCKET/tfds --config.data.tokenizer_dir=gs://BUCKET/tokenizers
Takes: never trained here (no TPU); only compiled ahead of time for TPU slices (docs/tpu.md). The shape, not the
       recipe, is Llama 2's: its tokenizer, data and 2T tokens are not reproduced.
"""

import os

from lmjax import config as config_lib


def get_config():
  # configs/c4.py's data (C4 en, 32k SentencePiece BPE, packed rows) and Llama-style block, at Llama-2-7B's shape.
  c = config_lib.load(os.path.join(os.path.dirname(__file__), 'c4.py'))
  m = c.model
  m.vocab_size = 32_000  # the tokenizer's size, set so `lmjax plan` needs no tokenizer
  m.max_len, m.n_layers, m.n_heads, m.d_model, m.d_ff = 4096, 32, 32, 4096, 11008
  m.tied_embeddings, m.param_dtype, m.attention = False, 'float32', 'auto'
  m.dtype, m.scan_layers, m.remat = 'bfloat16', True, 'full'
  c.train.batch_size, c.train.steps, c.train.steps_per_call = 64, 20_000, 1  # 262k tokens a step; ~5B tokens
  c.train.eval_every, c.train.eval_batch_size, c.train.eval_max_batches = 1000, 64, 20
  c.train.log_every, c.train.checkpoint_every = 10, 500
  c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps = 3e-4, 3e-5, 2000
  c.optimizer.b2 = 0.95
  c.mesh.data, c.mesh.fsdp = 1, -1  # weights and optimizer state over every chip of the slice
  return c
