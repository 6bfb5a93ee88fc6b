"""C4 (en) on a TPU VM: a ~125M-parameter GPT (12 layers, d_model 768, RoPE, SwiGLU, RMSNorm) on 1024-token packed
rows of web documents, 32k SentencePiece BPE, global batch 256 rows (262k tokens), 100k steps (~26B tokens).

Prepare (once, a machine with network; c4/en is ~800 GB of array_record):
       tfds build c4/en --data_dir=gs://BUCKET/tfds --file_format=array_record
Run (on every host of the TPU VM slice):
       lmjax train --config=configs/c4.py --workdir=gs://BUCKET/runs/c4 --config.data.data_dir=gs://BUCKET/tfds \
         --config.data.tokenizer_dir=gs://BUCKET/tokenizers
Each host reads only its 1/process_count of the shuffled documents. Train the tokenizer once before a multi-host
run (start the command on one host and stop it once it logs its first step) so every host loads the same cached
model from data.tokenizer_dir.
Check first (any host, libtpu): lmjax plan --config=configs/c4.py --topology=v5e-16
       compiles the train step, eval step and sampler for the slice: memory per chip against HBM, the attention
       kernel (splash) and the compiler's step-time estimate. docs/tpu.md tables what was compiled for v5e-16,
       v6e-16 and v5p-64.
Takes: never trained here (no TPU), only compiled ahead of time. Budget roughly a day on a v4-32; record the
       measured time, val loss and bits per byte here when first run.
"""

from lmjax.config import default_config


def get_config():
  c = default_config()
  c.data.dataset, c.data.feature = 'c4/en', 'text'
  c.data.train_split, c.data.eval_split = 'train', 'validation'
  c.data.rows = 'packed'
  c.data.tokenizer, c.data.spm_model_type, c.data.spm_vocab_size = 'spm', 'bpe', 32_000
  c.data.spm_train_chars = 50_000_000
  c.data.read_threads = 16
  m = c.model
  m.max_len, m.n_layers, m.n_heads, m.d_model = 1024, 12, 12, 768
  m.norm, m.positions, m.mlp, m.use_bias = 'rmsnorm', 'rope', 'swiglu', False
  m.d_ff, m.dtype, m.remat, m.scan_layers = 2048, 'bfloat16', 'save_proj', True
  m.attention = 'auto'  # TPU: Pallas splash attention; GPU: cuDNN (lmjax/attention.py)
  c.train.batch_size, c.train.steps = 256, 100_000
  c.train.eval_every, c.train.eval_batch_size, c.train.eval_max_batches = 2000, 256, 20  # fixed 5k-row subset
  c.train.log_every, c.train.checkpoint_every, c.train.steps_per_call = 100, 2000, 10
  c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps = 6e-4, 6e-5, 2000
  c.mesh.fsdp = -1
  c.mesh.data = 1
  return c
