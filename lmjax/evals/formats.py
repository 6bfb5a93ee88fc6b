"""Evaluation files read from local disk (nothing is downloaded): multiple-choice items, generation items with
references, and prompt sets.

Multiple choice, lmjax's own layout, one JSON object per line:
  {"query": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}
Each choice is scored as the continuation " " + choice of the query (lmjax/evals/loglikelihood.py). An item with
one choice is a LAMBADA-style item: its accuracy is whether greedy decoding would produce the choice.

The public benchmarks' own JSONL layouts map onto it as lm-evaluation-harness's task YAMLs map them (0-shot):
  hellaswag  {"activity_label", "ctx_a", "ctx_b", "endings", "label"} -> query "<activity>: <ctx_a> <Ctx_b>",
             the endings as choices, both cleaned as the harness cleans them (WikiHow's "[title]" and bracketed
             artifacts removed); the file of the validation split (the test split has no labels)
  arc        {"question", "choices": {"text", "label"}, "answerKey"} (Hugging Face's ai2_arc), or AI2's own
             {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} -> "Question: <q>\\nAnswer:"
  piqa       {"goal", "sol1", "sol2", "label"} -> "Question: <goal>\\nAnswer:" with choices sol1, sol2; the original
             release keeps labels in a separate file, one per line (the task option labels=FILE)
  lambada    {"text"} -> the text without its last word; the last word is the one choice
The layout is recognised from the first line's keys.

Generation: {"prompt": str, "reference": str or [str, ...]}. Prompts (diversity): a text file with one prompt per
line, or a .jsonl file of {"prompt": str}.

A line that cannot be used is a DataError naming file:line and what to write instead.
"""

from __future__ import annotations

import dataclasses
import os
import re

from lmjax import sources
from lmjax.errors import DataError

LAYOUTS = ('lmjax', 'hellaswag', 'arc', 'piqa', 'lambada')


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
  query: str
  choices: tuple  # of str
  gold: int
  where: str  # file:line, for messages


@dataclasses.dataclass(frozen=True)
class GenItem:
  prompt: str
  references: tuple  # of str
  where: str


def _detect(obj: dict) -> str:
  keys = set(obj)
  if {'query', 'choices', 'gold'} <= keys:
    return 'lmjax'
  if {'ctx_a', 'ctx_b', 'endings'} <= keys:
    return 'hellaswag'
  if {'question', 'answerKey'} <= keys:
    return 'arc'
  if {'goal', 'sol1', 'sol2'} <= keys:
    return 'piqa'
  if 'text' in keys:
    return 'lambada'
  return ''


def read_choices(path: str, layout: str = '', labels: str = '', limit: int = 0) -> list[ChoiceItem]:
  """The multiple-choice items of a JSONL file in one of LAYOUTS ('' = recognised from the first line)."""
  if layout and layout not in LAYOUTS:
    raise DataError(f'format={layout!r} is not a multiple-choice layout; use one of {", ".join(LAYOUTS)}')
  gold_lines = _label_lines(labels) if labels else None
  items = []
  for k, (n, obj) in enumerate(sources.jsonl_objects(path)):
    where = f'{path}:{n}'
    if not layout:
      layout = _detect(obj)
      if not layout:
        raise DataError(
          f'{where}: keys {sorted(obj)} match no known layout; write {{"query": str, "choices": [str, ...], '
          '"gold": int}, or the HellaSwag, ARC, PIQA or LAMBADA layout (lmjax/evals/formats.py)'
        )
    if gold_lines is not None:
      if k >= len(gold_lines):
        raise DataError(f'{labels} has {len(gold_lines)} labels but {path} has more items; give one label per item')
      obj = {**obj, 'label': gold_lines[k]}
    try:
      query, choices, gold = _MAPPERS[layout](obj)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise DataError(f'{where}: not a {layout} item ({type(e).__name__}: {e}); {_EXPECT[layout]}') from None
    items.append(_checked(query, choices, gold, where, layout))
    if limit and len(items) >= limit:
      break
  if not items:
    raise DataError(f'{path} holds no item; write one JSON object per line')
  return items


def _label_lines(path: str) -> list[int]:
  if not os.path.isfile(path):
    raise DataError(f'labels={path} does not exist; give the file of labels, one integer per line')
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  for n, line in enumerate(lines, 1):
    if not line.lstrip('-').isdigit():
      raise DataError(f'{path}:{n}: {line!r} is not an integer label; write one integer per line')
  return [int(x) for x in lines]


def _checked(query, choices, gold, where: str, layout: str) -> ChoiceItem:
  if not isinstance(query, str):
    raise DataError(f'{where}: the query must be a string, got {type(query).__name__}; {_EXPECT[layout]}')
  if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
    raise DataError(f'{where}: choices must be a non-empty list of strings; {_EXPECT[layout]}')
  if isinstance(gold, bool) or not isinstance(gold, int):
    raise DataError(f'{where}: gold must be an integer index into the choices, got {gold!r}; {_EXPECT[layout]}')
  if not 0 <= gold < len(choices):
    raise DataError(
      f'{where}: gold {gold} is out of range for {len(choices)} choices; use an index from 0 to {len(choices) - 1}'
    )
  return ChoiceItem(query, tuple(choices), gold, where)


_EXPECT = {
  'lmjax': 'write {"query": str, "choices": [str, ...], "gold": int}',
  'hellaswag': 'HellaSwag lines have activity_label, ctx_a, ctx_b, endings and an integer label (validation split)',
  'arc': 'ARC lines have question, choices {text, label} (or question {stem, choices}) and answerKey',
  'piqa': 'PIQA lines have goal, sol1, sol2 and label (or labels=FILE)',
  'lambada': 'LAMBADA lines have a text of two words or more',
}


def hellaswag_clean(text: str) -> str:
  """HellaSwag text as the harness cleans it: WikiHow's ' [title]' becomes a sentence end, other bracketed
  artifacts go, and double spaces become single ones."""
  text = text.strip().replace(' [title]', '. ')
  text = re.sub('\\[.*?\\]', '', text)
  return text.replace('  ', ' ')


def _hellaswag(obj):
  ctx = obj['ctx_a'] + ' ' + obj['ctx_b'].capitalize()
  label = obj['label']
  if label in ('', None):
    raise ValueError('no label (the test split has none: use the validation split)')
  return hellaswag_clean(obj['activity_label'] + ': ' + ctx), [hellaswag_clean(e) for e in obj['endings']], int(label)


def _arc(obj):
  q = obj['question']
  if isinstance(q, dict):  # AI2's own release
    texts, labels, q = [c['text'] for c in q['choices']], [c['label'] for c in q['choices']], q['stem']
  else:
    texts, labels = obj['choices']['text'], obj['choices']['label']
  return f'Question: {q}\nAnswer:', texts, list(labels).index(obj['answerKey'])


def _piqa(obj):
  return f'Question: {obj["goal"]}\nAnswer:', [obj['sol1'], obj['sol2']], int(obj['label'])


def _lambada(obj):
  words = obj['text'].split(' ')
  if len(words) < 2:
    raise ValueError('a text of one word has no context')
  return ' '.join(words[:-1]), [words[-1]], 0


_MAPPERS = {
  'lmjax': lambda o: (o['query'], o['choices'], o['gold']),
  'hellaswag': _hellaswag,
  'arc': _arc,
  'piqa': _piqa,
  'lambada': _lambada,
}
assert tuple(_MAPPERS) == LAYOUTS


def read_generation(path: str, limit: int = 0) -> list[GenItem]:
  """{"prompt", "reference"} items; a reference is a string or a list of strings."""
  items = []
  for n, obj in sources.jsonl_objects(path):
    where = f'{path}:{n}'
    prompt, ref = obj.get('prompt'), obj.get('reference')
    refs = [ref] if isinstance(ref, str) else ref
    if (
      not isinstance(prompt, str) or not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs)
    ):
      raise DataError(f'{where}: write {{"prompt": str, "reference": str or [str, ...]}}; got keys {sorted(obj)}')
    items.append(GenItem(prompt, tuple(refs), where))
    if limit and len(items) >= limit:
      break
  if not items:
    raise DataError(f'{path} holds no item; write one {{"prompt": ..., "reference": ...}} object per line')
  return items


def read_prompts(path: str, limit: int = 0) -> list[str]:
  """Prompts, one per line of a text file (blank lines skipped), or {"prompt": str} lines of a .jsonl file."""
  if path.endswith('.jsonl'):
    prompts = []
    for n, obj in sources.jsonl_objects(path):
      if not isinstance(obj.get('prompt'), str):
        raise DataError(f'{path}:{n}: write {{"prompt": str}}; got keys {sorted(obj)}')
      prompts.append(obj['prompt'])
  else:
    if not os.path.isfile(path):
      raise DataError(f'{path} does not exist (or is not a file); give a text file with one prompt per line')
    with open(path, 'rb') as f:
      raw = f.read()
    try:
      text = raw.decode('utf-8').replace('\r\n', '\n').replace('\r', '\n')  # any line ending, as text mode reads
      prompts = [line for line in text.split('\n') if line.strip()]
    except UnicodeDecodeError as e:
      line = raw.count(b'\n', 0, e.start) + 1
      raise DataError(f'{path}:{line}: not UTF-8 at byte {e.start} ({e.reason}); save the file as UTF-8') from None
  if not prompts:
    raise DataError(f'{path} holds no prompt; write one per line (or {{"prompt": str}} lines in a .jsonl file)')
  return prompts[:limit] if limit else prompts
