"""Metrics: the logger's outputs."""

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='needs torch installed (tensorboardX imports it)')
def test_the_logger_writes_tensorboard_events_without_importing_torch(tmp_path):
  # tensorboardX imports torch whenever it is installed, for seconds of start-up; the logger keeps it out, and
  # torch stays importable afterwards.
  code = (
    f'import os, sys\nfrom lmjax import metrics\nlog = metrics.Logger({str(tmp_path)!r}, progress_bar=False)\n'
    'log.write(1, {"train_loss": 2.5}, echo=False)\nlog.close()\n'
    'assert "torch" not in sys.modules, "torch was imported"\n'
    f'assert os.listdir(os.path.join({str(tmp_path)!r}, "tensorboard"))\n'
    'import torch\nprint("torch", torch.__version__)\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'torch ' in out.stdout
