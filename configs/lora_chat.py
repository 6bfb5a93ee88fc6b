"""LoRA fine-tuning of a Hugging Face model on chat data, then sampling it as a chat and exporting the adapters.

The data: JSONL, one {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]} per line,
rendered with the model's own chat template (its tokenizer_config.json); the loss covers the assistant turns only.
The base is frozen: the optimizer state and the checkpoints hold the rank-8 adapters alone (about 1% of GPT-2 124M's
checkpoint), and `export-hf --peft` writes them as a PEFT adapter. The architecture and tokenizer come from
train.init_from; this file sets the adapters and the schedule.

The real flow, on a machine with the weights (any saved GPT-2 or Llama directory; a chat model brings its own
template, a base GPT-2 has none: give one with --config.data.chat_template=FILE.jinja):
  lmjax train --config=configs/lora_chat.py --workdir=runs/chat --config.train.init_from=hf:/models/Llama-3.2-1B-Instruct \
    --config.data.train_split=chats_train.jsonl --config.data.eval_split=chats_val.jsonl
  lmjax sample --workdir=runs/chat --chat --prompt="What is LoRA?" --max_new_tokens=100 --temperature=0.7
  lmjax eval --workdir=runs/chat                                  # loss of the assistant turns: base + adapters
  lmjax export-hf --workdir=runs/chat --to=runs/chat_adapter --peft  # PeftModel.from_pretrained(base, DIR) loads it

The tiny variant fine-tunes a random-weight GPT-2 built locally in about 15 s on a 2-core CPU (110 steps; val loss
~5.4 -> ~5.2: a random model, so the point is the flow, not the text):
  python experiments/tiny_hf.py --out=runs/tiny_chat_hf --chat=runs/chat --pairs=
  lmjax train --config=configs/lora_chat.py:tiny --workdir=runs/tiny_chat
  lmjax sample --workdir=runs/tiny_chat --chat --prompt="First Citizen:" --max_new_tokens=20 --greedy
"""

from lmjax.config import default_config


def get_config(variant=''):
  c = default_config()
  c.train.init_from = 'hf:models/base'  # hf:DIR of a saved transformers model, or an `lmjax import-hf` workdir
  c.data.dataset = 'chat'
  c.data.rows = 'packed'
  c.data.train_split = 'data/chats_train.jsonl'
  c.data.eval_split = 'data/chats_val.jsonl'
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.lora.targets = ('q', 'k', 'v', 'o')
  c.train.epochs = 3.0  # train.steps follows from the data
  c.train.batch_size = 8
  c.train.log_every = 10
  c.train.eval_every = c.train.checkpoint_every = 100
  c.train.eval_batch_size = 8
  c.optimizer.lr, c.optimizer.min_lr = 2e-4, 2e-5
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  if variant == 'tiny':
    c.train.init_from = 'hf:runs/tiny_chat_hf'
    c.data.train_split, c.data.eval_split = 'runs/chat_train.jsonl', 'runs/chat_val.jsonl'
    c.train.eval_every = c.train.checkpoint_every = 20
    c.optimizer.lr, c.optimizer.min_lr = 1e-2, 1e-3
    c.optimizer.warmup_steps = 5
  elif variant:
    raise ValueError(f"configs/lora_chat.py has variants '' and 'tiny', not {variant!r}")
  return c
