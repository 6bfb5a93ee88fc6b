"""Test set-up: 8 simulated CPU devices (for sharding tests), shared Tiny Shakespeare, no network."""

import json
import os
import pathlib
import socket
import sys

import jax
import pytest

try:  # before any test touches a backend; harmless if a plugin already started one with 8 devices
  jax.config.update('jax_num_cpu_devices', 8)
except RuntimeError:
  pass
jax.config.update('jax_numpy_rank_promotion', 'raise')  # implicit rank broadcasting hides shape bugs

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data' / 'tinyshakespeare'
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the hub hangs without network; tests build their HF models


@pytest.fixture(scope='session')
def shakespeare_dirs(tmp_path_factory):
  """(manual_dir, data_dir): the shared input.txt and a TFDS data_dir prepared once per test session."""
  if not (SHARED_DATA / 'input.txt').exists():
    pytest.skip(f'{SHARED_DATA}/input.txt is missing')
  from lmjax import sources

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  sources.prepare_tiny_shakespeare(data_dir, str(SHARED_DATA))
  return str(SHARED_DATA), data_dir


@pytest.fixture
def no_network(monkeypatch):
  """Any connection attempt fails at once instead of hanging (TFDS downloads hang on this machine)."""

  def refuse(*a, **k):
    raise OSError('network access attempted in a test')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def tiny_overrides(manual_dir, data_dir, **extra):
  """Overrides that point configs/tiny.py at the session's prepared data."""
  items = {'data.manual_dir': manual_dir, 'data.data_dir': data_dir, 'train.progress_bar': 'false', **extra}
  return [f'{k}={v}' for k, v in items.items()]


ONE_DEVICE = ['mesh.data=1']  # deterministic layout for bitwise comparisons; sharded runs: tests/test_parallel.py


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_tiny(workdir, dirs, *extra, cache=None, **kw):
  """Trains configs/tiny.py on one device into `workdir` with `extra` overrides; kw go to train.train."""
  overrides = tiny_overrides(*dirs) + ONE_DEVICE + list(extra)
  if cache:
    overrides.append(f'train.compilation_cache_dir={cache}')
  with jax.default_device(jax.devices()[0]):
    from lmjax import config as config_lib, train  # pylint: disable=import-outside-toplevel

    return train.train(config_lib.load('configs/tiny.py', overrides), str(workdir), **kw)


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


@pytest.fixture(scope='session')
def trained(tmp_path_factory, shakespeare_dirs, cache_dir):
  """One tiny run of 60 steps, shared by the tests that only read its results."""
  workdir = tmp_path_factory.mktemp('run')
  train_tiny(workdir, shakespeare_dirs, cache=cache_dir)
  return str(workdir)


def tiny_train_command(workdir, overrides):
  """The real CLI training configs/tiny.py into `workdir` with `a.b=value` overrides, for subprocess tests."""
  return [
    sys.executable,
    '-m',
    'lmjax',
    'train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    *(f'--config.{o}' for o in overrides),
  ]


def load_tiny_hf():
  """experiments/tiny_hf.py (random-weight HF models and their tokenizers), imported by path."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location('tiny_hf', REPO / 'experiments' / 'tiny_hf.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='session')
def hf_models(tmp_path_factory):
  """Saved transformers models with random weights, built once per session, by name: gpt2 (tied), gpt2_untied
  (an odd width: 36 = 4 heads of 9), llama (grouped-query, untied, Llama 3.1 rope scaling), llama_tied
  (multi-query, tied, in two safetensors shards), and one of each FAMILY_SHAPES. Returns {name: directory}."""
  pytest.importorskip('transformers')
  tiny_hf = load_tiny_hf()
  text = tiny_hf.read_shakespeare()[:100_000]
  root = tmp_path_factory.mktemp('hf')
  llama3 = {
    'rope_type': 'llama3',
    'factor': 8.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 16,
    'rope_theta': 500000.0,
  }
  shapes = {
    'gpt2': dict(arch='gpt2'),
    'gpt2_untied': dict(arch='gpt2', n_embd=36, tie_word_embeddings=False, activation_function='gelu'),
    'llama': dict(arch='llama', rope_scaling=llama3, rope_theta=500000.0),
    'llama_tied': dict(arch='llama', num_key_value_heads=1, tie_word_embeddings=True, max_shard_size='40KB'),
    **{name: dict(arch=name, **shape) for name, shape in FAMILY_SHAPES.items()},
  }
  out = {}
  for name, kw in shapes.items():
    out[name] = str(root / name)
    tiny_hf.save(out[name], text=text, **{'std': 0.3, **kw})
  return out


# The families beside GPT-2 and Llama (tests/test_hf_families.py), each at the smallest shape that uses what it
# adds: heads wider or narrower than hidden / heads, windows of 8 positions under 48-token inputs (58 while
# generating), Gemma's pre-attention scalar apart from its head dim, caps the logits reach. Gemma's embeddings are
# scaled up by sqrt(hidden): a smaller init keeps its greedy tokens from collapsing onto one or two.
FAMILY_SHAPES = {
  'qwen2': dict(hidden_size=32, intermediate_size=48, tie_word_embeddings=True, rope_theta=1e6),
  'qwen3': dict(hidden_size=32, intermediate_size=48, head_dim=16),
  'mistral': dict(hidden_size=32, intermediate_size=48, head_dim=12, sliding_window=8),
  'gemma2': dict(
    hidden_size=32,
    intermediate_size=48,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=8,
    attn_logit_softcapping=0.5,
    final_logit_softcapping=3.0,
    std=0.05,
  ),
  'gemma3': dict(
    hidden_size=32,
    intermediate_size=48,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=8,
    layer_types=['sliding_attention', 'full_attention'],
    rope_parameters={
      'sliding_attention': {'rope_type': 'default', 'rope_theta': 100.0},
      'full_attention': {'rope_type': 'default', 'rope_theta': 10000.0},
    },
    final_logit_softcapping=3.0,
    std=0.05,
  ),
}
