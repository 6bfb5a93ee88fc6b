"""A ~1.06B-parameter Llama-style GPT for one 80 GB GPU (H100): 18 layers, d_model 2048, 16 heads of 128, SwiGLU
MLP 5632, RoPE, RMSNorm, no biases, untied 32k embeddings, 2048-token packed rows of C4, batch 32 rows (64k tokens).
bf16 compute with float32 master weights and AdamW state; cuDNN flash attention ('auto' on GPU); layers scanned;
remat 'save_proj' (projection outputs kept, norms, activations and attention recomputed).

Measure:  lmjax bench --config=configs/gpu_1b.py --steps=10
Prepare (once, a machine with network): tfds build c4/en --data_dir=DATA --file_format=array_record
Run:      lmjax train --config=configs/gpu_1b.py --workdir=runs/gpu_1b --config.data.data_dir=DATA
Why these settings (one H100 80GB HBM3, 2026-11-27, `lmjax bench`, MFU against the tabled 989 TFLOP/s):
  remat none: batch 8 42.4-42.6%, batch 12 43.6%. save_proj: batch 8 46.2%, 16 49.2%, 24 50.3%, 32 50.1-50.6%.
  Recomputing beat storing even at equal batch (245.7 against 266-267 ms/step at batch 8), and the memory it frees
  buys the larger batch. XLA flags tried (no Triton GEMMs, latency-hiding scheduler): no gain. All in
  experiments/results.jsonl.
Takes: NOT RUN end to end (no C4 on the lent GPU). At the measured 0.90 s/step, 15k steps (~1B tokens) would take
       ~3.7 h on one H100, plus evals.
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
  m.attention, m.scan_layers, m.remat = 'auto', True, 'save_proj'
  c.train.batch_size, c.train.steps = 32, 15_000  # ~1B tokens
  c.train.eval_every, c.train.eval_batch_size, c.train.eval_max_batches = 1000, 32, 20
  c.train.log_every, c.train.checkpoint_every = 50, 1000
  c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps = 3e-4, 3e-5, 500
  c.optimizer.b2 = 0.95
  c.mesh.data, c.mesh.fsdp = 1, -1  # one GPU: a mesh of 1; more GPUs shard weights and optimizer state
  return c
