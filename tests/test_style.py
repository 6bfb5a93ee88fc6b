"""House habits that a machine can check: the code is formatted (ruff format, configured in pyproject.toml)."""

import subprocess
import sys

from conftest import REPO


def test_the_code_is_formatted():
  proc = subprocess.run(
    [sys.executable, '-m', 'ruff', 'format', '--check', 'lmjax', 'tests', 'experiments', 'configs'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, f'run `ruff format lmjax tests experiments configs`:\n{proc.stdout}{proc.stderr}'
