"""Device mesh, logical-axis rules and shardings: the only place that knows how arrays are laid over devices.

The model names its axes logically ('embed', 'heads', 'mlp', ...); RULES map those names onto the mesh axes
data / fsdp / tensor, and `config.mesh.rules` may override any of them (`make_rules`). The batch is split over
(data, fsdp); FSDP shards weights over 'embed'; tensor parallelism splits heads, kv heads, the MLP hidden dim and
the vocabulary. A dim that a mesh axis does not divide stays replicated rather than failing, so one config file
runs on 1 CPU, 8 devices or a pod slice: only the mesh changes.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmjax.errors import ConfigError

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

RULES = (
  ('batch', BATCH_AXES),
  ('vocab', 'tensor'),
  ('embed', 'fsdp'),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('mlp', 'tensor'),
  ('head_dim', None),
  ('norm', None),
  ('layers', None),
  ('length', None),
  ('embed_act', None),  # activations keep d_model whole: FSDP gathers weights, not activations
)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over the devices; one axis size may be -1 (= the devices left).

  mesh.slices > 1 (multi-slice): the devices are that many TPU slices joined over the data-center network, and the
  sizes describe one slice. The data axis spans the slices (it is slices x mesh.data long), so only the gradient
  all-reduce crosses the slow links; fsdp and tensor stay inside a slice (mesh_utils' hybrid mesh). Devices that
  carry no slice_index (CPU, GPU) are taken as `slices` equal groups in order, which is how tests check the layout.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = int(mesh_config.get('slices', 1) or 1)
  if slices < 1 or len(devices) % slices:
    raise ConfigError(f'mesh.slices={slices}: must be >= 1 and divide the {len(devices)} devices')
  sizes = _axis_sizes(mesh_config, len(devices) // slices)
  if slices == 1:
    if math.prod(sizes) < len(devices) and jax.process_count() > 1:
      raise ConfigError(
        f'mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} of the {len(devices)} devices of '
        'this multi-host job; set --config.mesh.data=-1 to use them all'
      )
    # A single process may use fewer devices than it has (one of 8 for sampling, a debugging run): the first ones.
    return Mesh(_device_grid(sizes, devices[: math.prod(sizes)]), AXES, axis_types=(AxisType.Auto,) * len(AXES))
  if math.prod(sizes) * slices != len(devices):
    raise ConfigError(
      f'mesh {dict(zip(AXES, sizes))} per slice x mesh.slices={slices} = {math.prod(sizes) * slices} devices, '
      f'but there are {len(devices)}: a multi-slice mesh uses every device (set one axis to -1)'
    )
  in_slice = {getattr(d, 'slice_index', None) for d in devices}
  if None in in_slice:
    arr = np.array(devices).reshape(slices * sizes[0], *sizes[1:])
  elif len(in_slice) != slices:
    raise ConfigError(f'mesh.slices={slices}, but the devices form {len(in_slice)} slice(s)')
  else:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

    arr = mesh_utils.create_hybrid_device_mesh(sizes, (slices, 1, 1), devices)
  return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _axis_sizes(mesh_config, n_devices: int) -> list[int]:
  """The configured (data, fsdp, tensor) with a -1 resolved to the devices left of `n_devices`."""
  sizes = [int(mesh_config[a]) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh sizes {dict(zip(AXES, sizes))}: each must be >= 1, and at most one may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if n_devices % known:
      raise ConfigError(f'mesh {dict(zip(AXES, sizes))}: {n_devices} devices are not divisible by {known}')
    sizes[free[0]] = n_devices // known
  if math.prod(sizes) > n_devices:
    raise ConfigError(
      f'mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but {n_devices} are '
      'available; set --config.mesh.data=-1 to use them all'
    )
  return sizes


def _device_grid(sizes, devices) -> np.ndarray:
  """Devices as an array of the mesh's shape; mesh_utils orders them so that neighbours on the mesh are neighbours
  on the interconnect (TPU torus)."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

  try:
    return mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except  -- unusual topologies: plain order is still correct
    return np.array(devices).reshape(sizes)


def platform(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of `mesh`'s devices, or of the mesh being traced under, else JAX's default
  backend. Decisions that depend on the hardware (kernels, RNG algorithm, chunking) read this rather than
  jax.default_backend(): a program compiled ahead of time for a TPU slice from a CPU host is traced here, for there."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if isinstance(mesh, Mesh):
    return mesh.devices.flat[0].platform
  device = None if mesh.empty else mesh.abstract_device
  return jax.default_backend() if device is None else device.platform


def make_rules(overrides=()) -> tuple:
  """RULES with `overrides`, pairs (logical name, mesh axis | tuple of mesh axes | None), replacing same-named rules.

  From the config: --config.mesh.rules="(('embed', None), ('mlp', ('fsdp', 'tensor')))" stops sharding weights
  over fsdp and splits the MLP hidden dim over both axes. Lists work too (config.json stores tuples as lists).
  """
  rules = dict(RULES)
  for pair in overrides or ():
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ConfigError(f"mesh.rules: each rule is (logical name, mesh axes), e.g. ('embed', 'fsdp'); got {pair!r}")
    name, axes = pair
    axes = axes if axes is None or isinstance(axes, str) else tuple(axes)
    unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in AXES]
    if unknown:
      raise ConfigError(f'mesh.rules: {unknown} in the rule for {name!r} are not mesh axes; use {AXES} or None')
    rules[name] = axes
  return tuple(rules.items())


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
  """Mesh and logical rules for tracing: the model's activation constraints resolve against them."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def traced_with(fn, mesh: Mesh, rules=RULES):
  """`fn` that enters `mesh` and `rules` itself while it is traced, so a jitted step applies its activation
  constraints (nn.with_logical_constraint) whatever context the caller traces it in: outside any mesh they
  would silently do nothing, and the trace cache does not key on Flax's rules."""

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def shard_map_logical(fn, args, arg_axes):
  """fn(*args) run on each device's shard (jax.shard_map), for kernels XLA cannot partition itself (Pallas).
  Each argument's spec comes from its logical axis names (`arg_axes`, None for a replicated argument or a None
  argument) under the mesh and rules being traced with; the output is laid out like the first argument. Without a
  mesh of several devices, fn(*args)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  rules = nn.get_logical_axis_rules() or RULES
  specs = tuple(
    P() if axes is None or x is None else spec_for(axes, x.shape, mesh, rules) for axes, x in zip(arg_axes, args)
  )
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def spec_for(logical_axes, shape, mesh: Mesh, rules=RULES) -> P:
  """PartitionSpec for one array from its logical axis names; indivisible dims and reused mesh axes replicate."""
  rules = dict(rules)
  used, out = set(), []
  for name, dim in zip(logical_axes, shape):
    mesh_axes = rules.get(name) if name else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    mesh_axes = tuple(a for a in (mesh_axes or ()) if mesh.shape[a] > 1 and a not in used)
    if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      out.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    else:
      out.append(None)
  return P(*out)


def param_shardings(boxed_params, mesh: Mesh, rules=RULES):
  """NamedSharding per parameter from the logical names `init` attached (nn.Partitioned boxes)."""

  def one(x):
    names = tuple(x.names) if isinstance(x, nn.Partitioned) else (None,) * x.ndim
    value = x.value if isinstance(x, nn.Partitioned) else x
    return NamedSharding(mesh, spec_for(names, value.shape, mesh, rules))

  return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _path(keys) -> tuple:
  """Key path -> names, the same for dict keys and dataclass/NamedTuple fields (optax states are the latter)."""
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in keys)


def match_shardings(tree, params, param_shardings, mesh: Mesh):
  """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has its shape (Adam's
  moments, momentum) is laid out like that parameter; anything else (step counts, factored statistics) is
  replicated."""
  by_path = {
    _path(p): (x.shape, sh)
    for (p, x), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))
  }

  def one(keys, x):
    path = _path(keys)
    for i in range(len(path)):
      shape, sh = by_path.get(path[i:], (None, None))
      if shape == x.shape:
        return sh
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over (data, fsdp); with steps_per_call > 1, batches carry a leading step axis first."""
  lead = (None,) * (ndim - 2)
  return NamedSharding(mesh, P(*lead, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> one global array per key (each host holds only its shard)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
