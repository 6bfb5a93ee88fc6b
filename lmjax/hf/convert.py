"""Hugging Face directories to lmjax workdirs and back: `import_hf` and `export_hf`, for any family in the table
(lmjax/hf/families.py)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from lmjax import config as config_lib
from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import families
from lmjax.hf.source import read, resolve_source
from lmjax.hf.tensors import SAFETENSORS

# What an import writes into its workdir (tokenizers.save writes the spec and the HF file beside it): a directory
# holding only these, with no checkpoint yet, is an import that stopped early and may be written again.
IMPORT_WRITES = (
  'config.json',
  'tokenizer.json',
  'hf_tokenizer.json',
  'chat_template.jinja',
  'provenance.json',
  'checkpoints',
)


def import_config(fields: dict, source: str):
  """The lmjax config of an imported model: today's defaults with the model's fields and the 'hf' tokenizer."""
  config = config_lib.default_config()
  config.model.update(fields)
  config.data.tokenizer = 'hf'
  config.data.hf_tokenizer = os.path.abspath(source)
  config.train.steps = 1  # nothing was trained here; a fine-tune sets its own schedule (train.init_from)
  config.train.eval_batch_size = 8  # rows of the full context: 64 of GPT-2's 1024 tokens would be GBs of logits
  return config


def import_hf(source: str, workdir: str) -> dict:
  """Writes the HF model in `source` (a directory, or a hub name) as an lmjax workdir: config.json, the
  tokenizer, provenance and a parameters-only checkpoint at step 0. Returns a summary. Refused, with nothing
  written: the source directory itself as the workdir, a workdir a live run holds, or one holding anything an
  import does not write."""
  from lmjax import model as model_lib, workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  source = resolve_source(source)
  check_target(workdir, source)
  fields, arch, tokenizer, params = read(source)  # every refusal comes before the workdir is created
  workdir_lib.ensure_writable(workdir)
  config = import_config(fields, source)
  config_lib.validate(config)
  meta = {
    'config': config.to_dict(),
    'tokenizer': tokenizer.spec(),
    'params_only': True,
    'imported_from': {'source': os.path.abspath(source), 'architecture': arch},
  }
  _to_device(params)
  write_imported(workdir, config, tokenizer, params, meta)
  n = model_lib.count_params(params)
  return {'workdir': workdir, 'architecture': arch, 'parameters': int(n), 'tokenizer_vocab': tokenizer.vocab_size}


def check_target(workdir: str, source: str, adapter: str = '') -> None:
  """Refuses, before anything is read or written, an import into its own model (or adapter) directory, a workdir a
  live run holds or one holding anything an import does not write, and a workdir that already has checkpoints."""
  from lmjax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  for what, directory in (('model', source), ('adapter', adapter)):
    if directory and os.path.realpath(workdir) == os.path.realpath(directory):
      raise InteropError(
        f'--workdir {workdir} is the {what} directory being imported; import into a new --workdir, so the Hugging '
        'Face files stay as they are'
      )
  workdir_lib.may_write(workdir, 'import-hf', IMPORT_WRITES)
  ckpt_dir = workdir_lib.checkpoint_dir(workdir)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise InteropError(f'{workdir} already holds checkpoints; import into a new --workdir')


def write_imported(workdir: str, config, tokenizer, params, meta: dict) -> None:
  """An import's one write: a parameters-only checkpoint at step 0, then the config, tokenizer and provenance,
  under the workdir's lock (a train started on this workdir meanwhile waits for the import)."""
  from lmjax import checkpoint, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from lmjax.steps import TrainState  # pylint: disable=import-outside-toplevel

  state = TrainState(step=np.zeros((), np.int32), params=params, opt_state=None)
  lock = workdir_lib.Lock(workdir).acquire()
  try:
    with checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir), async_save=False, data_iterator=False) as ckpt:
      ckpt.save(0, state, meta=meta, force=True)
      ckpt.wait()
    workdir_lib.record(config, tokenizer, workdir, primary=True)
  finally:
    lock.release()


def _to_device(tree: dict) -> None:
  """Moves each leaf to the default device in place, one at a time: its host copy is freed as soon as it is moved,
  and Orbax saves device arrays without another host copy of the whole model."""
  import jax  # pylint: disable=import-outside-toplevel

  for k, v in tree.items():
    if isinstance(v, dict):
      _to_device(v)
    else:
      tree[k] = jax.device_put(v)


def write_tokenizer(tokenizer, out: str) -> bool:
  """tokenizer.json and tokenizer_config.json that AutoTokenizer loads, for an 'hf' tokenizer; False otherwise."""
  from lmjax import tokenizers  # pylint: disable=import-outside-toplevel

  if not isinstance(tokenizer, tokenizers.HFTokenizer):
    return False
  with open(os.path.join(out, 'tokenizer.json'), 'wb') as f:
    f.write(tokenizer.raw)
  token = lambda i: tokenizer._tok.id_to_token(i) if i is not None else None  # pylint: disable=protected-access
  settings = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'bos_token': token(tokenizer.bos_id),
    'eos_token': token(tokenizer.eos_id),
    'pad_token': token(tokenizer.pad_id),
    'add_bos_token': tokenizer.adds_bos,
    'clean_up_tokenization_spaces': False,
  }
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump({k: v for k, v in settings.items() if v is not None}, f, indent=2)
  return True


def check_export(cfg: ModelConfig, tokenizer, out: str) -> dict:
  """The HF config.json a model exports as, after refusing what cannot be written (a model transformers has no
  class for, an output that is a file or a non-empty directory) before any array is read."""
  hf = families.hf_config(cfg, tokenizer)
  if os.path.exists(out) and not os.path.isdir(out):
    raise InteropError(f'--to {out} is a file; export into a new directory')
  if os.path.exists(out) and os.listdir(out):
    raise InteropError(f'{out} is not empty; export into a new directory')
  return hf


def write_model(out: str, hf: dict, params, cfg: ModelConfig, tokenizer) -> dict:
  """Writes host `params` (layers unstacked) as a directory that transformers' from_pretrained loads: config.json
  (`hf`, from check_export), model.safetensors, and the tokenizer when it is an 'hf' one. Returns a summary."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  os.makedirs(out, exist_ok=True)
  arch = hf['architectures'][0]
  tensors = dict(families.from_params(params, cfg, arch))
  save_file(tensors, os.path.join(out, SAFETENSORS), metadata={'format': 'pt'})
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  has_tokenizer = write_tokenizer(tokenizer, out)
  if not has_tokenizer:
    print(
      f'lmjax export-hf: the run uses the {tokenizer.spec()["kind"]!r} tokenizer, which has no Hugging Face '
      'tokenizer file; the model loads with from_pretrained, the tokenizer stays with lmjax',
      file=sys.stderr,
    )
  return {
    'out': out,
    'architecture': arch,
    'parameters': int(sum(x.size for x in tensors.values())),
    'tokenizer': has_tokenizer,
  }
