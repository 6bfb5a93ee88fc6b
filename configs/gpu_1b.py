"""A ~1.06B-parameter Llama-style GPT for one 80 GB GPU (H100): 18 layers, d_model 2048, 16 heads of 128, SwiGLU
MLP 5632, RoPE, RMSNorm, no biases, untied 32k embeddings, 2048-token packed rows of C4, batch 8 rows (16k tokens).
bf16 compute with float32 master weights and AdamW state; cuDNN flash attention ('auto' on GPU); layers scanned.

Measure:  lmjax bench --config=configs/gpu_1b.py --steps=10
Prepare (once, a machine with network): tfds build c4/en --data_dir=DATA --file_format=array_record
Run:      lmjax train --config=configs/gpu_1b.py --workdir=runs/gpu_1b --config.data.data_dir=DATA
Memory (lmjax plan, XLA's analysis of the compiled step): see README. Remat is off: on one GPU the activations of
8 x 2048 tokens fit beside the 17 GB of weights, gradients and AdamW state, and recomputation would cost ~1/3 more
matmul time that MFU does not count. Larger batches: train.grad_accum, or model.remat='save_proj'.
Takes: NOT RUN end to end (no C4 on the lent GPU); `lmjax bench` figures on an H100 are in README and
       experiments/results.jsonl.
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
  m.vocab_size = 32_000  # the tokenizer's size, set so `lmjax bench` and `lmjax plan` need no tokenizer
  m.max_len, m.n_layers, m.n_heads, m.d_model, m.d_ff = 2048, 18, 16, 2048, 5632
  m.norm, m.positions, m.mlp, m.use_bias, m.tied_embeddings = 'rmsnorm', 'rope', 'swiglu', False, False
  m.dtype, m.param_dtype = 'bfloat16', 'float32'
  m.attention, m.scan_layers, m.remat = 'auto', True, 'none'
  c.train.batch_size, c.train.steps = 8, 60_000  # ~1B tokens
  c.train.eval_every, c.train.eval_batch_size, c.train.eval_max_batches = 2000, 8, 50
  c.train.log_every, c.train.checkpoint_every = 50, 2000
  c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps = 3e-4, 3e-5, 2000
  c.optimizer.b2 = 0.95
  c.mesh.data, c.mesh.fsdp = 1, -1  # one GPU: a mesh of 1; more GPUs shard weights and optimizer state
  return c
