"""Chat data: conversations rendered with the tokenizer's own chat template, the loss on assistant turns only.

A chat file is JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line (data.dataset='chat').
Each conversation is rendered with the Jinja chat template as transformers' apply_chat_template renders it (a
sandboxed environment, trim_blocks and lstrip_blocks, `raise_exception`, the special tokens as variables), then
tokenized without added specials, as apply_chat_template(..., tokenize=True) does: the token ids are the same
(tests/test_chat.py checks). The template is data.chat_template (a .jinja file, or the template text itself), else
the tokenizer's: `chat_template` in its tokenizer_config.json or a chat_template.jinja beside it.

Which tokens are the assistant's is found by rendering prefix by prefix: the text an assistant turn adds after
the conversation before it with the generation prompt is that turn (its end-of-turn marker included, so the model
learns to stop), and a token belongs to it when its first character does. Only those targets carry loss weight.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np

from lmjax.errors import DataError, TokenizerError

ROLES = ('system', 'user', 'assistant', 'tool')
TEMPLATE_FILE = 'chat_template.jinja'  # transformers 5 saves the template as this file beside tokenizer_config.json


def template_of(directory: str) -> str | None:
  """The chat template a Hugging Face tokenizer directory holds (chat_template.jinja, else tokenizer_config.json's
  chat_template; a list of named templates gives its 'default'), or None."""
  path = os.path.join(directory, TEMPLATE_FILE)
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  path = os.path.join(directory, 'tokenizer_config.json')
  try:
    with open(path, encoding='utf-8') as f:
      template = json.load(f).get('chat_template')
  except (OSError, ValueError, AttributeError):
    return None
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, {'name': 'tool_use', ...}]
    template = next((t.get('template') for t in template if isinstance(t, dict) and t.get('name') == 'default'), None)
  return template if isinstance(template, str) else None


def resolve(setting: str, tokenizer) -> str:
  """The template a run uses: data.chat_template (a file, or the template text) or the tokenizer's own."""
  if setting:
    if os.path.isfile(setting):
      with open(setting, encoding='utf-8') as f:
        return f.read()
    if '{' in setting:
      return setting
    raise TokenizerError(f'data.chat_template={setting!r} is neither a file nor a Jinja template; give a .jinja file')
  template = getattr(tokenizer, 'chat_template', None)
  if template:
    return template
  raise TokenizerError(
    'the tokenizer has no chat template (no chat_template in its tokenizer_config.json, no chat_template.jinja); '
    'give one with --config.data.chat_template=FILE.jinja (or the template text)'
  )


class Template:
  """A chat template compiled as transformers compiles it, with the tokenizer's special tokens as variables."""

  def __init__(self, source: str, tokenizer):
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

    class Generation(ext.Extension):  # {% generation %}...{% endgeneration %} (transformers' marker): its body
      tags = {'generation'}

      def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

      def _body(self, caller):
        return caller()

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
    )
    env.filters['tojson'] = tojson
    env.globals['raise_exception'] = raise_exception
    env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
    self._errors = (jinja2.exceptions.TemplateError,)
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise TokenizerError(f'the chat template does not compile (line {e.lineno}: {e.message})') from None
    tok = getattr(tokenizer, '_tok', None)
    token = lambda i: tok.id_to_token(int(i)) if tok is not None and i is not None else None
    self.tokenizer = tokenizer
    self.specials = {
      'bos_token': token(getattr(tokenizer, 'bos_id', None)) or '',
      'eos_token': token(getattr(tokenizer, 'eos_id', None)) or '',
      'pad_token': token(getattr(tokenizer, 'pad_id', None)),
    }

  def render(self, messages, add_generation_prompt: bool = False, where: str = 'the conversation') -> str:
    try:
      return self._template.render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **self.specials
      )
    except self._errors as e:
      raise DataError(f'{where}: the chat template refused it: {e}') from None

  def encode(self, messages, where: str = 'the conversation') -> dict:
    """{'ids': the conversation's tokens, 'assistant': 1 where a token is an assistant turn's} (int32 each)."""
    text = self.render(messages, where=where)
    spans = []
    for k, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      before = self.render(messages[:k], add_generation_prompt=True, where=where)
      upto = self.render(messages[: k + 1], where=where)
      if not (upto.startswith(before) and text.startswith(upto)):
        raise DataError(
          f'{where}: the chat template does not render a conversation as the prefix of a longer one, so the '
          'assistant turns cannot be found; give another data.chat_template'
        )
      spans.append((len(before), len(upto)))
    enc = self.tokenizer._tok.encode(text, add_special_tokens=False)  # pylint: disable=protected-access
    starts = np.asarray([s for s, _ in enc.offsets], np.int64)
    assistant = np.zeros(len(enc.ids), np.int32)
    for lo, hi in spans:
      assistant |= ((starts >= lo) & (starts < hi)).astype(np.int32)
    return {'ids': np.asarray(enc.ids, np.int32), 'assistant': assistant}

  def prompt(self, user_text: str) -> str:
    """`lmjax sample --chat`: a user message rendered with the generation prompt."""
    return self.render([{'role': 'user', 'content': user_text}], add_generation_prompt=True, where='--prompt')


def check_messages(obj, where: str) -> list:
  """The messages of one JSONL line, checked: a list of {'role': one of ROLES, 'content': a string}."""
  messages = obj.get('messages')
  if not isinstance(messages, list) or not messages:
    keys = ', '.join(sorted(obj)) or 'none'
    raise DataError(f'{where} has no "messages" list (its keys: {keys}); write {{"messages": [{{"role", "content"}}]}}')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get('content'), str):
      raise DataError(f'{where}: message {i} must be an object with a string "content"; got {json.dumps(m)[:80]}')
    if m.get('role') not in ROLES:
      raise DataError(f'{where}: message {i} has role {m.get("role")!r}; the roles are {", ".join(ROLES)}')
  if not any(m['role'] == 'assistant' for m in messages):
    raise DataError(f'{where}: the conversation has no assistant turn, so nothing to train on')
  return messages


class ChatFiles:
  """Conversations of JSONL lines (lmjax/sources.py reads them: `lines` is (FILE:LINE, object) pairs), all checked
  up front, so a bad one fails before training starts, named as file:line."""

  def __init__(self, lines, pattern: str):
    self.docs = [{'messages': check_messages(obj, where), 'where': where} for where, obj in lines]
    if not self.docs:
      raise DataError(f'the files matching {pattern!r} hold no conversation')

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i) -> dict:
    return self.docs[int(i)]
