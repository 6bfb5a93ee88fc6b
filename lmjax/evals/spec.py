"""One evaluation task as a string, the same on the command line (`lmjax eval --task=...`) and in a config
(`train.eval_tasks`):

  KIND[:DATA][,KEY=VALUE]...

  mc:FILE.jsonl     multiple choice (lmjax's layout, or HellaSwag, ARC, PIQA, LAMBADA: lmjax/evals/formats.py)
                    keys: format=LAYOUT, labels=FILE (PIQA's separate labels), bos=true (start every context with
                    BOS, as the harness's add_bos_token=True)
  ppl:SPLIT         loss, perplexity and bits per byte of a split of the run's own dataset (validation, test, ...)
  ppl:PATH          ... or of local text files: a path or glob with a '/' in it (./notes.txt for the current folder)
  gen:FILE.jsonl    generation against references: exact match, BLEU, ROUGE-L (greedy unless told otherwise)
                    keys: max_new_tokens, temperature, top_k, top_p, min_p, stop, seed
  div:FILE          diversity of free samples of each prompt (a text file, one prompt per line, or .jsonl):
                    distinct-1/2/3 and self-BLEU; keys as gen, plus num_samples (default 8); sampled with the
                    run's sample.* settings unless told otherwise
  every kind:       name=NAME (default: the file's or split's name), limit=N (the first N items),
                    every=STEPS (in the training loop; default train.eval_every)

A task's numbers are named NAME/METRIC (hellaswag/acc, validation/ppl) in metrics.jsonl and TensorBoard. `stop`
takes backslash escapes (stop=\\n). Imports nothing of lmjax but the errors.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re

from lmjax.errors import ConfigError

KINDS = ('mc', 'ppl', 'gen', 'div')  # the kinds of train.eval_tasks and `lmjax eval --task`
_DECODING = {
  'max_new_tokens': int,
  'temperature': float,
  'top_k': int,
  'top_p': float,
  'min_p': float,
  'stop': str,
  'seed': int,
}
_COMMON = {'name': str, 'limit': int, 'every': int}
OPTIONS = {
  'mc': {**_COMMON, 'format': str, 'labels': str, 'bos': bool},
  'ppl': dict(_COMMON),
  'gen': {**_COMMON, **_DECODING},
  'div': {**_COMMON, **_DECODING, 'num_samples': int},
}
assert tuple(OPTIONS) == KINDS


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  kind: str
  data: str
  name: str
  options: dict
  text: str  # as written

  def get(self, key, default=None):
    return self.options.get(key, default)


def parse(text: str, data: str = '') -> TaskSpec:
  """A TaskSpec from `KIND[:DATA][,KEY=VALUE]...`; `data` fills DATA when the text has none (--data=FILE)."""
  head, *pairs = text.split(',')
  kind, _, inline = head.partition(':')
  kind = kind.strip()
  if kind not in KINDS:
    raise ConfigError(f'eval task {text!r}: unknown kind {kind!r}; write KIND:DATA with KIND one of {", ".join(KINDS)}')
  if inline and data:
    raise ConfigError(f'eval task {text!r} names its data and --data={data} gives another; give one of them')
  data = inline or data
  if not data:
    raise ConfigError(f'eval task {text!r} names no data; write {kind}:FILE (or pass --data=FILE after --task={kind})')
  options = {}
  for pair in pairs:
    key, eq, value = pair.partition('=')
    key = key.strip()
    if not eq or key not in OPTIONS[kind]:
      raise ConfigError(
        f'eval task {text!r}: {pair!r} is not KEY=VALUE with a key of {kind} tasks ({", ".join(OPTIONS[kind])})'
      )
    options[key] = _value(text, key, value, OPTIONS[kind][key])
  name = options.pop('name', '') or default_name(kind, data)
  if not re.fullmatch(r'[A-Za-z0-9_.+\-]+', name):
    raise ConfigError(f'eval task {text!r}: name={name!r} may hold only letters, digits and _.+-')
  return TaskSpec(kind, data, name, options, text)


def _value(text, key, value, kind):
  try:
    if kind is bool:
      if value.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
        raise ValueError
      return value.lower() in ('true', '1', 'yes')
    if kind is str:
      return codecs.decode(value, 'unicode_escape') if key == 'stop' else value
    out = kind(value)
  except ValueError:
    raise ConfigError(f'eval task {text!r}: {key}={value!r} is not a {kind.__name__}') from None
  if key in ('limit', 'every', 'max_new_tokens', 'num_samples', 'top_k', 'seed') and out < 0:
    raise ConfigError(f'eval task {text!r}: {key} must be >= 0, got {out}')
  return out


def is_path(data: str) -> bool:
  """ppl's DATA: a path or glob when it has a '/' (split names never do), else a split of the run's dataset."""
  return '/' in data


def default_name(kind: str, data: str) -> str:
  if kind == 'ppl' and not is_path(data):
    base = data
  else:
    base = os.path.basename(data.rstrip('/')) or data
    base = base.split('.')[0] if not any(c in base for c in '*?[') else os.path.basename(os.path.dirname(data))
  return re.sub(r'[^A-Za-z0-9_.+\-]', '_', base) or kind


def parse_all(texts, datas=()) -> list[TaskSpec]:
  """The tasks of repeated --task flags; the --data flags fill, in order, the tasks that name no data."""
  datas = list(datas)
  specs = []
  for text in texts:
    needs = ':' not in text.split(',')[0]
    specs.append(parse(text, datas.pop(0) if needs and datas else ''))
  if datas:
    raise ConfigError(f'--data {datas} left over: every --data fills a --task that names no data (--task=mc)')
  names = [s.name for s in specs]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ConfigError(f'eval tasks named {twice} more than once; give each a name=NAME of its own')
  return specs
