"""LM1B (One Billion Word) with a 32k SentencePiece model, sized like the Flax lm1b example: 6 layers, d_model 512,
8 heads, MLP 2048, 128-token packed rows, batch 256, 500k steps, lr 1.6e-3 with 1k warmup. For a GPU or TPU.

Prepare (a machine with network, once): `tfds build lm1b --data_dir=gs://BUCKET/tfds --file_format=array_record`
Run:   lmjax train --config=configs/lm1b.py --workdir=gs://BUCKET/runs/lm1b --config.data.data_dir=gs://BUCKET/tfds \
         --config.data.tokenizer_dir=gs://BUCKET/tokenizers
Check first (any host, libtpu): lmjax plan --config=configs/lm1b.py --topology=v5e-16 --vocab_size=32000
       (memory per chip, kernel, the compiler's step-time estimate; docs/tpu.md tables what was compiled).
Takes: never trained in lmjax yet (no accelerator here), only compiled ahead of time for TPU slices. The Flax
       example reports ~ten hours on a TPU v3-8 for 500k steps; expect the same order here. Record the measured
       time and val loss / bits per byte when first run.
The SentencePiece model trains on 10M characters of the train split at first use (minutes on one host) and is
cached in data.tokenizer_dir, so later runs (and every other host, which must share that dir) reuse it.
"""

from lmjax.config import default_config


def get_config():
  c = default_config()
  c.data.dataset, c.data.feature = 'lm1b', 'text'
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.rows = 'packed'  # sentences are short: pack ~5 of them per 128-token row
  c.data.tokenizer, c.data.spm_model_type, c.data.spm_vocab_size = 'spm', 'unigram', 32_000
  c.data.read_threads = 8
  m = c.model
  m.max_len, m.n_layers, m.n_heads, m.d_model, m.d_ff = 128, 6, 8, 512, 2048
  m.dropout, m.dtype = 0.1, 'bfloat16'
  m.tied_embeddings, m.positions = True, 'learned'
  c.train.batch_size, c.train.steps = 256, 500_000
  c.train.eval_every, c.train.eval_batch_size, c.train.eval_max_batches = 2000, 256, 40  # ~10k rows: fixed subset
  c.train.log_every, c.train.checkpoint_every = 100, 10_000
  c.train.steps_per_call = 10
  c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps = 1.6e-3, 1e-5, 1000
  c.optimizer.weight_decay = 0.1
  return c
