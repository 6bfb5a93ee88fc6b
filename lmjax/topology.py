"""TPU slices by name, for compiling ahead of time on any host: their devices, and each chip's memory and peak.

libtpu (`pip install 'lmjax[tpu]'`) describes a slice it is not running on: `devices('v5e-16')` gives the 16
compile-only devices of a v5e 4x4 slice, which jax.jit(...).lower(...).compile() targets like real ones. Nothing
runs, so a CPU host checks what a TPU run would do (lmjax/plan.py).

Names: the accelerator types of Cloud TPU (`v5e-16`, `v6e-8`: chips; `v4-32`, `v5p-64`: TensorCores, two per chip,
one device each as megacore) or libtpu's own `GEN:SHAPE` (`v5e:4x4`, `v5p:2x4x4`). `slices` > 1 describes that
many such slices joined over the data-center network (multi-slice); each device then carries its slice_index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re

from lmjax import hostenv
from lmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # 'v5e'
  device_kind: str  # what JAX's devices call it
  hbm_bytes: int  # the HBM XLA's TPU compiler makes available to one program (its out-of-memory message says it)
  cores_per_chip: int  # TensorCores counted in the accelerator type's number


_G = 1 << 30
CHIPS = {
  c.generation: c
  for c in (
    Chip('v4', 'TPU v4', int(30.75 * _G), 2),
    Chip('v5e', 'TPU v5 lite', int(15.75 * _G), 1),
    Chip('v5p', 'TPU v5', int(95.74 * _G), 2),
    Chip('v6e', 'TPU v6 lite', int(31.25 * _G), 1),
  )
}
_BY_KIND = {c.device_kind: c for c in CHIPS.values()}
# Slice shapes by chip count: v5e and v6e are 2-D tori, v4 and v5p 3-D ones.
_SHAPES_2D = {4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
_SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8'}
_SHAPES_3D.update({512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'})
_SHAPES = {'v4': _SHAPES_3D, 'v5p': _SHAPES_3D, 'v5e': _SHAPES_2D, 'v6e': _SHAPES_2D}
INSTALL = "pip install 'lmjax[tpu]' (libtpu, which compiles for TPUs on any host)"


def known_names() -> list[str]:
  names = []
  for c in CHIPS.values():
    names += [f'{c.generation}-{chips * c.cores_per_chip}' for chips in _SHAPES[c.generation]]
  return names


def libtpu_shape(name: str) -> str:
  """'v5e-16' -> 'v5e:4x4'; a 'GEN:SHAPE' name as it is. ConfigError (listing the known names) otherwise."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))', name)
  if m and m[3]:
    return name
  if m:
    per_chip, shapes = CHIPS[m[1]].cores_per_chip, _SHAPES[m[1]]
    n = int(m[2])
    if n % per_chip == 0 and n // per_chip in shapes:
      return f'{m[1]}:{shapes[n // per_chip]}'
  raise ConfigError(f'unknown TPU topology {name!r}; known: {", ".join(known_names())}, or GEN:SHAPE like v5e:4x4')


def devices(name: str, slices: int = 1) -> list:
  """The compile-only devices of `slices` slices of the named topology (slice-major order)."""
  shape = libtpu_shape(name)
  if slices < 1:
    raise ConfigError(f'--slices must be >= 1, got {slices}')
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(f'compiling for TPU topology {name!r} needs libtpu: {INSTALL}')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  kwargs = {'chip_config_name': 'megacore'} if shape.startswith('v4:') else {}  # v4: one device per chip, as v5p
  if slices > 1:
    kwargs['num_slices'] = slices
  try:
    with _quiet_libtpu():
      return list(topologies.get_topology_desc(platform='tpu', topology_name=shape, **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except  -- libtpu refuses a shape it cannot lay out
    raise ConfigError(f'libtpu cannot describe TPU topology {name!r} ({shape}): {e}') from e


def chip_of(device) -> Chip | None:
  """The Chip spec of a device (real or compile-only); None off TPU or for a kind not in CHIPS."""
  return _BY_KIND.get(getattr(device, 'device_kind', ''))


@contextlib.contextmanager
def _quiet_libtpu():
  """Off a TPU VM libtpu looks for the VM's metadata (worker addresses, host bounds), finds none and logs errors
  that change nothing for a compile-only slice: telling it this host is a single worker keeps them out. It also
  takes a lock file that lets one process at a time own the TPU, so a second compiling process (pytest -n 2, two
  plans) would be refused; with no TPU to own, loads may share. A real TPU VM (a /dev/accel* or /dev/vfio device)
  is left to its own metadata and lock. libtpu reads these when it loads, so they are set only around that: left
  in the environment, they reached every later run and subprocess, which took this host for a TPU pod."""
  if hostenv.has_tpu():
    yield
    return
  settings = {'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_HOST_BOUNDS': '1,1,1', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  before = {k: os.environ.get(k) for k in settings}
  os.environ.update({k: v for k, v in settings.items() if before[k] is None})
  try:
    yield
  finally:
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
