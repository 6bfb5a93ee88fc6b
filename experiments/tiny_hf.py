"""Small Hugging Face models with random weights, built locally, for the fine-tune recipe's tiny variant, the tests
and the interop benchmark: nothing is downloaded.

  python experiments/tiny_hf.py --out=runs/tiny_gpt2_hf --pairs=runs/pairs

writes a GPT2LMHeadModel (random weights, saved by transformers as safetensors) with a byte-level BPE tokenizer
trained on Tiny Shakespeare, and runs/pairs_train.jsonl / runs/pairs_val.jsonl: prompt/completion pairs (a line of
the play, then the line after it). Needs torch and transformers (the test extra).

  python experiments/tiny_hf.py --out=runs/tiny_chat_hf --chat=runs/chat --pairs=

gives the model a chat template (CHAT_TEMPLATE, in its tokenizer files) and writes runs/chat_train.jsonl /
runs/chat_val.jsonl: conversations {"messages": [{"role", "content"}, ...]}, a user line answered by the next.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')


@functools.lru_cache(maxsize=8)  # the tests build several models on one text: train each tokenizer once
def byte_bpe(text: str, vocab_size: int, bos: bool):
  """A byte-level BPE tokenizer (GPT-2's scheme) trained on `text`, as a transformers fast tokenizer. Specials:
  <|endoftext|> (id 0), and with `bos` also <s> (id 1), which the tokenizer puts before every sequence (Llama's
  convention); without it, <|endoftext|> is both BOS and EOS (GPT-2's)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ['<|endoftext|>'] + (['<s>'] if bos else [])
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator([text], trainer)
  if bos:
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token='<|endoftext|>', bos_token='<s>' if bos else '<|endoftext|>'
  )


# The decoder families beside GPT-2 (the transformers config class and model class of each); BOS says whether
# the family's tokenizer puts a BOS token before every sequence (Qwen's does not).
DECODERS = {
  'llama': ('LlamaConfig', 'LlamaForCausalLM'),
  'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM'),
  'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM'),
  'mistral': ('MistralConfig', 'MistralForCausalLM'),
  'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM'),
  'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM'),
}
BOS = ('llama', 'mistral', 'gemma2', 'gemma3')

# A small chat template in the shape of the real ones: role markers, the BOS first, each assistant turn closed by
# the EOS (so sampling stops there), the generation prompt opening an assistant turn.
CHAT_TEMPLATE = (
  '{{ bos_token }}{% for m in messages %}'
  "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
  "{% endif %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
  "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def model(arch: str, vocab_size: int, seed: int = 0, std: float = 0.02, **shape):
  """A randomly initialised GPT2LMHeadModel ('gpt2') or one of DECODERS; `shape` overrides the tiny default config
  fields; `std` is the init scale (larger than 0.02 makes greedy decoding less degenerate). Norm weights and
  biases, which transformers initialises to constants, get noise of `std` too, so a test sees their use."""
  import torch
  import transformers

  torch.manual_seed(seed)
  if arch == 'gpt2':
    fields = dict(n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, initializer_range=std, **{**fields, **shape})
    return transformers.GPT2LMHeadModel(cfg).eval()
  fields = dict(
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1 if arch in BOS else 0,
    eos_token_id=0,
  )
  config_class, model_class = (getattr(transformers, name) for name in DECODERS[arch])
  cfg = config_class(vocab_size=vocab_size, initializer_range=std, **{**fields, **shape})
  m = model_class(cfg).eval()
  if arch != 'llama':  # (the Llama tests' recorded models predate the noise)
    with torch.no_grad():
      for name, p in m.named_parameters():
        if 'norm' in name or name.endswith('bias'):
          p.add_(std * torch.randn_like(p))
  return m


def save(
  out: str,
  arch: str = 'gpt2',
  text: str | None = None,
  vocab_size: int = 300,
  model_vocab=0,
  max_shard_size=None,
  chat_template=None,
  **kw,
):
  """Writes a tiny model and its tokenizer into `out` as save_pretrained does; returns (model, tokenizer).
  `model_vocab`: the embedding's rows when larger than the tokenizer's vocabulary (GPT-2's 50257).
  `chat_template`: saved with the tokenizer (apply_chat_template and lmjax's data.dataset='chat' use it)."""
  text = text if text is not None else read_shakespeare()[:200_000]
  tokenizer = byte_bpe(text, vocab_size, bos=arch in BOS)
  tokenizer.chat_template = chat_template
  m = model(arch, max(len(tokenizer), model_vocab), **kw)
  extra = {'max_shard_size': max_shard_size} if max_shard_size else {}
  m.save_pretrained(out, safe_serialization=True, **extra)
  tokenizer.save_pretrained(out)
  return m, tokenizer


def read_shakespeare() -> str:
  with open(SHAKESPEARE, encoding='utf-8') as f:
    return f.read()


def write_pairs(prefix: str, text: str | None = None, n_train: int = 400, n_val: int = 100) -> tuple[str, str]:
  """prompt/completion JSONL files from consecutive lines of the play: PREFIX_train.jsonl and PREFIX_val.jsonl."""
  text = text if text is not None else read_shakespeare()
  lines = [line for line in text.split('\n') if line.strip()]
  pairs = [{'prompt': a + '\n', 'completion': b + '\n'} for a, b in zip(lines[0::2], lines[1::2])]
  paths = []
  for name, chunk in (('train', pairs[:n_train]), ('val', pairs[n_train : n_train + n_val])):
    path = f'{prefix}_{name}.jsonl'
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
      f.writelines(json.dumps(p) + '\n' for p in chunk)
    paths.append(path)
  return tuple(paths)


def write_chats(prefix: str, text: str | None = None, n_train: int = 200, n_val: int = 40) -> tuple[str, str]:
  """Conversations from consecutive lines of the play: PREFIX_train.jsonl and PREFIX_val.jsonl. A user line is
  answered by the next; every third has a system message, every fourth a second exchange."""
  text = text if text is not None else read_shakespeare()
  lines = [line for line in text.split('\n') if line.strip()]
  chats = []
  for i in range(n_train + n_val):
    a, b, c, d = lines[4 * i : 4 * i + 4]
    messages = [{'role': 'system', 'content': 'Answer in verse.'}] if i % 3 == 0 else []
    messages += [{'role': 'user', 'content': a}, {'role': 'assistant', 'content': b}]
    if i % 4 == 0:
      messages += [{'role': 'user', 'content': c}, {'role': 'assistant', 'content': d}]
    chats.append({'messages': messages})
  paths = []
  for name, chunk in (('train', chats[:n_train]), ('val', chats[n_train:])):
    path = f'{prefix}_{name}.jsonl'
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
      f.writelines(json.dumps(c) + '\n' for c in chunk)
    paths.append(path)
  return tuple(paths)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/tiny_gpt2_hf')
  p.add_argument('--arch', choices=('gpt2', *DECODERS), default='gpt2')
  p.add_argument('--pairs', default='runs/pairs', help='prefix of the prompt/completion files ("" = none)')
  p.add_argument('--chat', default='', help='prefix of chat files to write; the model gets CHAT_TEMPLATE ("" = none)')
  args = p.parse_args()
  save(args.out, args.arch, std=0.1, chat_template=CHAT_TEMPLATE if args.chat else None)
  print(f'wrote {args.out}')
  if args.pairs:
    print('wrote', *write_pairs(args.pairs))
  if args.chat:
    print('wrote', *write_chats(args.chat))


if __name__ == '__main__':
  main()
