"""A ~1.06B-parameter Llama-style GPT for one 80 GB GPU (H100): 18 layers, d_model 2048, 16 heads of 128, SwiGLU
MLP 5632, RoPE, RMSNorm, no biases, untied 32k embeddings, 2048-token packed rows of C4, batch 32 rows (64k tokens).
bf16 compute with float32 master weights and AdamW state; cuDNN flash attention ('auto' on GPU); layers scanned;
remat 'save_proj' (projection outputs kept, norms, activations and attention recomputed).

Measure:  lmjax bench --config=configs/gpu_1b.py --steps=10
Prepare (once, a machine with network): tfds build c4/en --data_dir=DATA --file_format=array_record
Run:      lmjax train --config=configs/gpu_1b.py --workdir=runs/gpu_1b --config.data.data_dir=DATA
Why these settings (one H100 80GB HBM3, 2026-11-27, `lmjax bench` on random unpacked rows, so cuDNN ran with
  is_causal and no segment mask; MFU against the tabled 989 TFLOP/s):
  remat none: batch 8 42.4-42.6%, batch 12 43.6%. save_proj: batch 8 46.2%, 16 49.2%, 24 50.3%, 32 50.1-50.6%.
  Recomputing beat storing even at equal batch (245.7 against 266-267 ms/step at batch 8), and the memory it frees
  buys the larger batch. XLA flags tried (no Triton GEMMs, latency-hiding scheduler): no faster step, though
  --xla_gpu_enable_triton_gemm=false compiled in 2.9 s instead of 8.0. All in experiments/results.jsonl.
Memory: it ran in the H100's 80 GB (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95). `lmjax plan --devices=1` on a CPU
       analyses the CPU's program ('xla' attention, no cuDNN) and reports 124 GiB of temporaries (136 GiB in
       all): it does not predict a GPU's memory.
Takes: NOT RUN end to end (no C4 on the lent GPU). At the benchmarked 0.90 s/step (unpacked rows), 15k steps
       (~1B tokens) would take ~3.7 h on one H100, plus evals.
"""

import os

from lmjax import config as config_lib


def get_config():
  # configs/c4.py's data (C4 en, 32k SentencePiece BPE, packed 2048-token rows) and Llama-style block; bigger here.
  c = config_lib.load(os.path.join(os.path.dirname(__file__), 'c4.py'))
  m = c.model
  m.vocab_size = 32_000  # the tokenizer's size, set so `lmjax bench` and `lmjax plan` need no tokenizer
  m.max_len, m.n_layers, m.n_heads, m.d_model, m.d_ff = 2048, 18, 16, 2048, 5632
  m.tied_embeddings, m.param_dtype, m.attention = False, 'float32', 'auto'
  m.dtype, m.scan_layers, m.remat = 'bfloat16', True, 'save_proj'
  c.train.batch_size, c.train.steps, c.train.steps_per_call = 32, 15_000, 1  # ~1B tokens; 0.9 s steps need no K
  c.train.eval_every, c.train.eval_batch_size, c.train.eval_max_batches = 1000, 32, 20
  c.train.log_every, c.train.checkpoint_every = 50, 1000
  c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps = 3e-4, 3e-5, 500
  c.optimizer.b2 = 0.95
  c.mesh.data, c.mesh.fsdp = 1, -1  # one GPU: a mesh of 1; more GPUs shard weights and optimizer state
  return c
