"""A transformers config.json as the families read it: typed reads that name the file and the key when a value is
missing or of the wrong kind, so a truncated or hand-edited file is one line, not a KeyError or TypeError."""

from __future__ import annotations

import json
import math
import os

from lmjax.errors import InteropError

_REQUIRED = object()


def read(directory: str) -> HFConfig:
  """DIRECTORY/config.json, or an InteropError saying why it cannot be used."""
  path = os.path.join(directory, 'config.json')
  if not os.path.isdir(directory):
    raise InteropError(
      f'{directory} is not a directory. Give the directory save_pretrained wrote (on a machine with network, '
      'download a hub model first: huggingface-cli download gpt2 --local-dir DIR)'
    )
  if not os.path.exists(path):
    raise InteropError(f'{directory} holds no config.json; is it a directory written by save_pretrained?')
  settings = read_json(path, 'save the model again')
  if not isinstance(settings, dict):
    raise InteropError(
      f'{path} holds a JSON {type(settings).__name__}, not an object of settings; save the model again'
    )
  return HFConfig(settings, path)


def read_json(path: str, fix: str):
  """The JSON value in PATH, or an InteropError naming the file, what is wrong, and FIX."""
  try:
    with open(path, 'rb') as f:
      return json.loads(f.read().decode('utf-8'))
  except OSError as e:
    raise InteropError(f'{path} cannot be read ({e.strerror or e})') from None
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting a RecursionError
    detail = ' '.join(str(e).split())[:120]
    raise InteropError(f'{path} is not valid JSON ({detail}): it is truncated or damaged; {fix}') from None


class HFConfig:
  """The settings of a config.json (or of an object inside one, such as rope_parameters)."""

  def __init__(self, settings: dict, where: str = 'config.json'):
    self.settings, self.where = settings, where

  def __contains__(self, key: str) -> bool:
    return key in self.settings

  def get(self, key: str, default=None):
    """The raw value (for the checks that compare it with what lmjax supports)."""
    return self.settings.get(key, default)

  def int(self, key: str, default=_REQUIRED, minimum: int = 1) -> int:
    x = self._value(key, default)
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
      self._wrong(key, x, f'an integer >= {minimum}')
    return x

  def float(self, key: str, default=_REQUIRED) -> float:
    x = self._value(key, default)
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
      self._wrong(key, x, 'a number')
    return float(x)

  def bool(self, key: str, default=_REQUIRED) -> bool:
    x = self._value(key, default)
    if not isinstance(x, bool):
      self._wrong(key, x, 'true or false')
    return x

  def object(self, key: str) -> HFConfig | None:
    """A nested object (None when absent, null or empty)."""
    x = self.settings.get(key)
    if x is not None and not isinstance(x, dict):
      self._wrong(key, x, 'an object')
    return HFConfig(x, f'{self.where} {key}') if x else None

  def _value(self, key, default):
    x = self.settings.get(key)
    if x is None:  # absent, or null: transformers reads null as "use the default" too
      if default is _REQUIRED:
        raise InteropError(f'{self.where} has no {key!r}; is the file complete? Save the model again')
      return default
    return x

  def _wrong(self, key, x, want):
    shown = repr(x) if len(repr(x)) <= 60 else repr(x)[:57] + '...'
    raise InteropError(f'{self.where} has {key}={shown}; expected {want}')
