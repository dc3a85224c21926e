"""Mesh construction and logical-axis sharding.

Parameters and activations carry *logical* axis names (`embed`, `mlp`, `heads`, `act_batch`, ...);
one rules table (`DEFAULT_LOGICAL_AXIS_RULES`, the default of config.logical_axis_rules) maps them to the mesh axes
("data", "fsdp", "tensor", "context"). No module names a mesh axis directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical axis -> mesh axes (MaxText-style rules): the default of config.logical_axis_rules, the only
# place where model dimensions meet mesh axes. Parameters and activations carry logical names.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", None),
    ("patch", None),
    ("action", None),
    ("embodiment", None),
    ("cond", None),
    ("conv", None),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolve the configured axis sizes (-1 = the rest) against the number of devices."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    bad = [a for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {num_devices}")
    return tuple(sizes)


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # A TPU torus whose axes cannot be grouped into the mesh axes (e.g. fsdp=16 x tensor=2 x
        # context=2 on 4x4x4): let mesh_utils split a physical axis between two mesh axes.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            out[logical] = ()
        elif isinstance(mesh_axes, str):
            out[logical] = (mesh_axes,)
        else:
            out[logical] = tuple(mesh_axes)
    return out


def logical_to_mesh_spec(logical_axes: Sequence[str | None] | None, rules,
                         mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec over mesh axes.

    A mesh axis is used at most once per array (first come, first served), and when `mesh` and
    `shape` are given, mesh axes that do not divide the dimension are dropped (the dimension is
    then replicated over them rather than failing to shard).
    """
    if not logical_axes:
        return PartitionSpec()
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; add it to logical_axis_rules")
        axes = []
        size = 1
        for a in table[name]:
            if a in used:
                continue
            n = mesh.shape[a] if mesh is not None else 1
            if shape is not None and mesh is not None and shape[i] % (size * n):
                continue
            axes.append(a)
            size *= n
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh, rules):
    """NamedSharding for every leaf of an nnx.State (or pure pytree of Variables) by its
    `out_sharding` logical names."""

    def f(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding")
            shape = x.get_value().shape
            return x.replace(NamedSharding(mesh, logical_to_mesh_spec(names, rules, mesh, shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(f, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Activation constraints -----------------------------------------------------------------------

@dataclasses.dataclass
class _Context(threading.local):
    mesh: Mesh | None = None
    rules: tuple = ()


_CTX = _Context()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules):
    """Within this context `constrain(x, names)` pins activations to the mesh by logical names."""
    prev = (_CTX.mesh, _CTX.rules)
    _CTX.mesh, _CTX.rules = mesh, tuple(rules)
    try:
        yield
    finally:
        _CTX.mesh, _CTX.rules = prev


def active_mesh() -> tuple[Mesh | None, tuple]:
    """(mesh, rules) of the enclosing `activation_sharding` ((None, ()) outside one)."""
    return _CTX.mesh, _CTX.rules


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `activation_sharding`."""
    mesh = _CTX.mesh
    if mesh is None or np.prod(list(mesh.shape.values())) == 1:
        return x
    spec = logical_to_mesh_spec(logical_axes, _CTX.rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def map_over_batch_and_heads(fn, *xs):
    """Run `fn` on each device's block of arrays laid out [B, L, H, ...] (batch, sequence, heads).

    Under `activation_sharding` with a multi-device mesh, `fn` runs inside `jax.shard_map` with the
    batch split over the mesh axes of `act_batch` and the heads over those of `act_heads`; the
    sequence is whole on every device (see `kairos_jax.parallel.context_parallel` for the mixers' form
    that splits the sequence over the `context` axis). Temporal mixers are independent across batch and heads,
    so this is exact, and it is what lets a Pallas kernel (a custom call XLA cannot partition)
    run on sharded activations without gathering them. Outputs have the same layout.
    """
    mesh = _CTX.mesh
    if mesh is None or np.prod(list(mesh.shape.values())) == 1:
        return fn(*xs)
    B, H = xs[0].shape[0], xs[0].shape[2]
    b = logical_to_mesh_spec(("act_batch",), _CTX.rules, mesh, (B,))[0]
    h = logical_to_mesh_spec(("act_heads",), _CTX.rules, mesh, (H,))[0]
    spec = lambda ndim: PartitionSpec(b, None, h, *([None] * (ndim - 3)))
    in_specs = tuple(spec(x.ndim) for x in xs)
    out_shape = jax.eval_shape(fn, *xs)
    out_specs = jax.tree.map(lambda o: spec(o.ndim), out_shape)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*xs)
