"""Every error a user can fix, in one place. Imports nothing.

The CLI prints any `UserError` as one line, `lmjax CMD: error: <message>`, and exits with code 2; every other
exception is a programming error and keeps its traceback. A message says what was wrong and how to fix it.
"""

from __future__ import annotations


class UserError(ValueError):
  """Base of every user-fixable error (a ValueError, so callers that catch ValueError keep working)."""


class ConfigError(UserError):
  """A config file, an override or a combination of fields that cannot be used."""


class DataError(UserError):
  """A dataset, split or file that cannot be read as asked."""


class TokenizerError(UserError):
  """A tokenizer that cannot be built, loaded, or does not match a run's recorded one."""


class CheckpointError(UserError):
  """A checkpoint that is missing, damaged, or does not match the model it is restored into."""


class SampleError(UserError):
  """A sampling request that cannot be served (bad flags, a prompt that does not fit, too much memory)."""


class TrainingError(UserError):
  """Training cannot go on as configured (a loss or parameters that stopped being finite)."""


class WorkdirError(UserError):
  """A workdir that cannot be created, written or read (a file in its place, a read-only or full disk)."""


class InteropError(UserError):
  """A Hugging Face model that cannot be imported, or a run that HF's model classes cannot express on export."""


class SweepError(UserError):
  """A sweep file that cannot be expanded or run: a bad field, a member whose config fails, an unknown variant."""


def one_line(e: BaseException) -> str:
  """An error's text on one line (messages may hold a library's multi-line detail): what every error line prints."""
  return ' '.join(str(e).split())
