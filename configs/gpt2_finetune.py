"""Fine-tune a Hugging Face GPT-2 on your own prompt/completion pairs, then sample, evaluate and export it.

The data: JSONL, one {"prompt": ..., "completion": ...} per line (other key names: data.prompt_field /
data.completion_field). The loss covers only the completion tokens; pairs are packed into rows with segment ids,
so attention never crosses from one pair into the next. The architecture and tokenizer come from
train.init_from; this file sets the schedule.

The real flow, on a machine with network access (gpt2 is 124M parameters, rows of its 1024-token context):
  lmjax import-hf --from=gpt2 --workdir=runs/gpt2
  lmjax train --config=configs/gpt2_finetune.py --workdir=runs/gpt2_ft \
    --config.data.train_split=my_train.jsonl --config.data.eval_split=my_val.jsonl
  lmjax sample --workdir=runs/gpt2_ft --prompt="..." --max_new_tokens=50 --temperature=0.7 --num_samples=3
  lmjax eval --workdir=runs/gpt2_ft          # val loss, perplexity and bits per byte of the completions
  lmjax export-hf --workdir=runs/gpt2_ft --to=runs/gpt2_ft_hf   # transformers' from_pretrained loads it

The tiny variant runs here in well under a minute, from a random-weight GPT-2 built locally:
  python experiments/tiny_hf.py --out=runs/tiny_gpt2_hf --pairs=runs/pairs
  lmjax import-hf --from=runs/tiny_gpt2_hf --workdir=runs/tiny_gpt2
  lmjax train --config=configs/gpt2_finetune.py:tiny --workdir=runs/tiny_gpt2_ft
"""

from lmjax.config import default_config


def get_config(variant=''):
  c = default_config()
  c.train.init_from = 'runs/gpt2'  # an `lmjax import-hf` workdir; hf:DIR reads a saved model directly
  c.data.dataset = 'jsonl'
  c.data.rows = 'packed'
  c.data.train_split = 'data/train.jsonl'
  c.data.eval_split = 'data/val.jsonl'
  c.model.dropout = 0.1  # GPT-2's own
  c.train.epochs = 3.0  # train.steps follows from the data: 3 passes
  c.train.batch_size = 16
  c.train.grad_accum = 2  # 8 rows per micro-batch
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.keep_best = 'val_loss'  # sample and export the best checkpoint with --step=best
  c.optimizer.lr, c.optimizer.min_lr = 5e-5, 5e-6
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  if variant == 'tiny':
    c.train.init_from = 'runs/tiny_gpt2'
    c.data.train_split, c.data.eval_split = 'runs/pairs_train.jsonl', 'runs/pairs_val.jsonl'
    c.model.dropout = 0.0
    c.train.epochs = 2.0
    c.train.eval_every = c.train.checkpoint_every = 20
    c.optimizer.lr, c.optimizer.min_lr = 3e-3, 3e-4
    c.optimizer.warmup_steps = 5
  elif variant:
    raise ValueError(f"configs/gpt2_finetune.py has variants '' and 'tiny', not {variant!r}")
  return c
