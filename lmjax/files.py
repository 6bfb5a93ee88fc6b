"""Writing a file whole or not at all: the one temporary-file-and-rename of lmjax.

A reader (another process, a resumed run, a crash's aftermath) sees the old file or the new one, never half of
either. Paths may be local or anything epath opens (gs:// on a TPU VM).
"""

from __future__ import annotations

import os
from typing import Callable, IO, Union

from etils import epath

Content = Union[bytes, str, Callable[[IO[bytes]], None]]


def write_atomic(path, content: Content, private: bool = False) -> None:
  """Writes `content` (bytes, text as UTF-8, or a function writing to the open binary file) to `path` through a
  temporary file in the same folder, renamed into place. `private` (local paths): the file is created 0o600
  whatever the umask, so no other user can ever write it. On any error the temporary file is removed and the error
  propagates: the caller says what it means (a lost cache entry, a workdir that cannot be written)."""
  path = epath.Path(path)
  tmp = path.parent / f'{path.name}.{os.getpid()}.tmp'  # one writer's own name: concurrent writers never collide
  write = (
    content if callable(content) else (lambda f: f.write(content.encode() if isinstance(content, str) else content))
  )
  try:
    if private:
      with os.fdopen(os.open(os.fspath(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'wb') as f:
        write(f)
    else:
      with tmp.open('wb') as f:
        write(f)
    tmp.replace(path)
  except BaseException:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise
