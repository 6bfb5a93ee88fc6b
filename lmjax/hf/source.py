"""A Hugging Face model directory (or a hub name), read and checked in full: `read(SOURCE)` returns the lmjax
model fields, the tokenizer and the parameters as numpy arrays, and writes nothing. Import, training's
`init_from=hf:DIR` and any other reader of starting parameters go through it."""

from __future__ import annotations

import os
from typing import NamedTuple

from lmjax.config import ModelConfig
from lmjax.errors import InteropError
from lmjax.hf import families, hfconfig
from lmjax.hf.tensors import Tensors, check_inside, model_root

_HUB_FILES = ['*.json', '*.safetensors', '*.txt', '*.model']


class HFModel(NamedTuple):
  """What `read` returns (a tuple, so `fields, arch, tokenizer, params = read(d)` works)."""

  fields: dict  # lmjax ModelConfig fields: ModelConfig(**fields) is the model
  architecture: str  # the transformers class, a key of families.FAMILIES
  tokenizer: object  # lmjax.tokenizers.HFTokenizer
  params: dict  # lmjax's parameter tree (one block_i per layer), numpy float32


def read(source: str) -> HFModel:
  """The model in `source` (a directory save_pretrained wrote, or a hub name: resolve_source), every file checked
  (paths, config.json, tokenizer, each tensor's name and shape) before the weights are read."""
  from lmjax import tokenizers  # pylint: disable=import-outside-toplevel

  directory = resolve_source(source)
  root = check_directory(directory)
  c = hfconfig.read(directory)
  family = families.of_hf_config(c)
  fields = family.model_fields(c)
  cfg = ModelConfig(**fields)
  problems = cfg.problems()
  if problems:
    raise InteropError(f'{c.where} describes a model lmjax cannot build: {"; ".join(problems)}')
  tokenizer = tokenizers.HFTokenizer.from_path(directory)  # a missing tokenizer.json is an error saying how to save it
  if tokenizer.vocab_size > cfg.vocab_size:
    raise InteropError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"
    )
  tensors = Tensors(directory, root)
  tensors.rename(family.rename(tensors.names()))
  families.check_tensors(tensors, cfg, family, directory)
  return HFModel(fields, family.ARCHITECTURE, tokenizer, family.to_params(tensors.get, cfg))


def read_hf_config(directory: str) -> dict:
  """DIRECTORY/config.json as a dict (InteropError when it is missing, not JSON, or not an object)."""
  return hfconfig.read(directory).settings


def check_directory(directory: str) -> str:
  """The folder the model's files must stay inside (tensors.model_root), after refusing any symlink in the
  directory that resolves outside it."""
  root = model_root(directory)
  if os.path.isdir(directory):  # (when it is not, hfconfig.read says so)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
      if entry.is_symlink():
        check_inside(entry.path, root, 'the symlink')
  return root


def resolve_source(source: str) -> str:
  """A directory as given, or a hub name: the model's folder in the local HF cache, downloaded first when the
  hub can be reached. With HF_HUB_OFFLINE=1 or no network, a name that is not cached is one InteropError."""
  path = os.path.expanduser(source)
  if os.path.exists(path) or source.startswith(('.', '/', '~')) or source.count('/') > 1:
    return path  # a path (hfconfig.read says if it is not a model directory)
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    from huggingface_hub import errors as hub  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise InteropError(
      f'{source} is not a directory; to fetch a hub model, pip install huggingface_hub (or download it yourself)'
    ) from None
  get = (
    f'on a machine with network, run `hf download {source} --local-dir DIR` (huggingface-cli download in older '
    'huggingface_hub) and pass --from=DIR, or fill the cache there and copy it here'
  )
  try:
    return huggingface_hub.snapshot_download(source, allow_patterns=_HUB_FILES)
  except hub.HFValidationError:
    raise InteropError(f'{source} is neither a directory nor a hub model name (ORG/NAME)') from None
  except (hub.RepositoryNotFoundError, hub.GatedRepoError) as e:
    raise InteropError(
      f'the hub has no model {source} that this machine may read ({type(e).__name__}); check the name, or for a '
      'private or gated model log in with `hf auth login`'
    ) from None
  except (hub.LocalEntryNotFoundError, hub.IncompleteSnapshotError, hub.OfflineModeIsEnabled) as e:
    why = 'HF_HUB_OFFLINE=1 forbids downloading it' if _offline() else 'the hub cannot be reached from here'
    cache = os.environ.get('HF_HUB_CACHE') or os.path.join(os.environ.get('HF_HOME', '~/.cache/huggingface'), 'hub')
    kind = 'incomplete in' if isinstance(e, hub.IncompleteSnapshotError) else 'not in'
    raise InteropError(
      f'{source} is not a directory, and is {kind} the local hub cache ({cache}); {why}; {get}'
    ) from None
  except (hub.HfHubHTTPError, OSError) as e:
    raise InteropError(f'downloading {source} from the hub failed ({type(e).__name__}: {e}); {get}') from None


def _offline() -> bool:
  return os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')
