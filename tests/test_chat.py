"""Chat data (lmjax/chat.py): conversations tokenize exactly as transformers' apply_chat_template does, the loss
covers the assistant turns alone, and bad files or tokenizers are one-line errors naming what to fix."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, load_tiny_hf
from lmjax import chat, cli, config as config_lib, data as data_lib, tokenizers

transformers = pytest.importorskip('transformers')

TEXT = open(REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt', encoding='utf-8').read()[:60_000]
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
  "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3's shape: BOS, a system turn hoisted out of the loop, headers, loop.last, trim_blocks doing its work.
LLAMA_LIKE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}
{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{% endif %}
{% for message in messages %}
{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles') }}{% endif %}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""
CONVERSATIONS = [
  [{'role': 'user', 'content': 'Who art thou?'}, {'role': 'assistant', 'content': 'A friend to Rome.'}],
  [
    {'role': 'system', 'content': 'Answer in verse.'},
    {'role': 'user', 'content': 'Speak, speak.'},
    {'role': 'assistant', 'content': 'You are all resolved rather to die than to famish?'},
    {'role': 'user', 'content': 'Resolved. resolved. '},
    {'role': 'assistant', 'content': ' We know it, we know it. <|endoftext|> ünïcode'},
  ],
]


@pytest.fixture(scope='module', params=['tiny', 'chatml', 'llama'])
def tokenizer_dir(request, tmp_path_factory):
  """A saved HF tokenizer with a chat template: the tiny model's (BOS = EOS), ChatML, a Llama-like one (own BOS)."""
  tiny_hf = load_tiny_hf()
  out = str(tmp_path_factory.mktemp(request.param))
  tok = tiny_hf.byte_bpe(TEXT, 300, bos=request.param == 'llama')
  tok.chat_template = {'tiny': tiny_hf.CHAT_TEMPLATE, 'chatml': CHATML, 'llama': LLAMA_LIKE}[request.param]
  tok.save_pretrained(out)
  return out


def _ids(x):
  return list(x['input_ids'] if hasattr(x, 'keys') else x)


def test_conversations_tokenize_exactly_as_apply_chat_template(tokenizer_dir):
  theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  ours = tokenizers.HFTokenizer.from_path(tokenizer_dir)
  template = chat.Template(chat.resolve('', ours), ours)
  for messages in CONVERSATIONS:
    assert list(template.encode(messages)['ids']) == _ids(theirs.apply_chat_template(messages, tokenize=True))
  user = [{'role': 'user', 'content': 'Who art thou?'}]
  want = _ids(theirs.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
  assert list(ours.encode(template.prompt('Who art thou?'))) == want


def test_the_loss_covers_the_assistant_turns_alone(tokenizer_dir):
  ours = tokenizers.HFTokenizer.from_path(tokenizer_dir)
  config = config_lib.default_config()
  config.data.dataset = 'chat'
  encode = data_lib.encoder(config, ours)
  messages = CONVERSATIONS[1]
  row = encode({'messages': messages})
  weighted_ids = [int(t) for t, w in zip(row['targets'], row['weights']) if w]
  weighted = ours._tok.decode(weighted_ids, skip_special_tokens=False)  # pylint: disable=protected-access
  for m in messages:
    assert (m['content'].strip() in weighted) == (m['role'] == 'assistant'), m
  assert data_lib.DocumentEncoder.n_bytes({'messages': messages}) == sum(
    len(m['content'].encode()) for m in messages if m['role'] == 'assistant'
  )


def _train(base, chats, capsys, *extra):
  capsys.readouterr()
  code = cli.main(
    [
      'train',
      '--config=configs/lora_chat.py:tiny',
      f'--workdir={os.path.dirname(chats)}/run',
      f'--config.train.init_from=hf:{base}',
      f'--config.data.train_split={chats}',
      f'--config.data.eval_split={chats}',
      *extra,
    ]
  )
  return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
  'line, words',
  [
    ('{"messages": [{"role": "robot", "content": "hi"}]}', ["role 'robot'", 'system, user, assistant']),
    (b'{"messages": "\xff"}', ['not UTF-8']),
    ('{"messages": [{"role": "user"', ['not valid JSON']),
    ('{"text": "no messages"}', ['no "messages" list']),
  ],
)
def test_a_bad_chat_line_is_named_as_file_line(hf_models, tmp_path, capsys, line, words):
  base = str(tmp_path / 'base')
  shutil.copytree(hf_models['gpt2'], base)
  with open(os.path.join(base, 'chat_template.jinja'), 'w') as f:
    f.write(load_tiny_hf().CHAT_TEMPLATE)
  chats = str(tmp_path / 'chats.jsonl')
  good = json.dumps({'messages': CONVERSATIONS[0]}).encode() + b'\n'
  with open(chats, 'wb') as f:
    f.write(good + good + (line if isinstance(line, bytes) else line.encode()) + b'\n')
  code, err = _train(base, chats, capsys)
  assert code == 2 and len(err) == 1, err
  assert f'{chats}:3' in err[0] and all(w in err[0] for w in words), err[0]


def test_a_tokenizer_without_a_chat_template_says_how_to_give_one(hf_models, tmp_path, capsys):
  chats = str(tmp_path / 'chats.jsonl')
  with open(chats, 'w') as f:
    f.write(json.dumps({'messages': CONVERSATIONS[0]}) + '\n')
  code, err = _train(hf_models['gpt2'], chats, capsys)
  assert code == 2 and len(err) == 1 and 'no chat template' in err[-1] and 'data.chat_template' in err[-1], err
  # ... and giving one is enough to get past it (the run then fails later only for want of real data here).
  template = str(tmp_path / 't.jinja')
  with open(template, 'w') as f:
    f.write(CHATML)
  tok = tokenizers.HFTokenizer.from_path(hf_models['gpt2'])
  config = config_lib.default_config()
  config.data.dataset, config.data.chat_template = 'chat', template
  row = data_lib.encoder(config, tok)({'messages': CONVERSATIONS[0]})
  assert np.asarray(row['weights']).sum() > 0
