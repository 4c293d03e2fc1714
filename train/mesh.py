"""Device mesh and sharding rules: logical axis names → mesh axes, as a small table of data.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism that also shards params and
optimizer state) and ``tensor`` (model parallelism inside a layer). The default puts every device on ``fsdp``, so params
and optimizer state are split over all of them (replicating them is opt-in: ``data=-1, fsdp=1``). On a multi-slice TPU
pod the sizes describe one slice (its ICI network) and ``data`` additionally spans the slices (DCN): only gradients
cross the slow network, once per step. The models name every parameter dimension with a
logical axis (``vocab``, ``embed``, ``heads``, ...); :data:`DEFAULT_RULES` says which mesh axis each one is split over.
A dimension whose size does not divide by its mesh axes' size is replicated instead (e.g. 3 KV heads on ``tensor=2``)
so that every preset runs on every mesh; two dimensions of one array mapped to the same mesh axis is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.sharding import ShardingContext
from train.config import ConfigError, MeshConfig

__all__ = [
    "ACTIVATION_RULES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "ShardingError",
    "activation_context",
    "batch_sharding",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "parse_rules",
    "path_str",
    "replicated",
    "state_shardings_like",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or a tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)


# How activations are laid out (models/sharding.py): rows over the data-parallel axes, heads / MLP / vocab features
# over ``tensor``. ``embed`` stays whole: fsdp splits the *params'* embed dimension, and the batch already uses it.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "length": (),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}


class ShardingError(ValueError):
    """A mesh or sharding rule that cannot work with the devices or arrays at hand."""


def _slices(devices: Sequence[Any]) -> list[list[Any]]:
    """Devices grouped by TPU slice (``slice_index``; one group where devices have none), in slice order."""
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(int(getattr(d, "slice_index", 0) or 0), []).append(d)
    return [groups[k] for k in sorted(groups)]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all processes).

    One axis size may be -1: it takes all remaining devices. The product must equal the device count of one slice;
    with several TPU slices (devices carrying different ``slice_index``) the ``data`` axis also spans the slices,
    so its size is ``slices × data`` (a hybrid ICI × DCN mesh, slice-local axes innermost).
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = _slices(devices)
    if len({len(s) for s in slices}) > 1:
        raise ShardingError(f"TPU slices of unequal size: {[len(s) for s in slices]} devices")
    sizes = _axis_sizes(mesh_cfg, len(slices[0]), len(slices))
    axis_types = (AxisType.Auto,) * 3
    if len(slices) == 1:
        # Auto axes: the classic GSPMD mode where shardings are annotations and XLA propagates the rest.
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(sizes), (len(slices), 1, 1), devices, allow_split_physical_axes=True
    )
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _axis_sizes(mesh_cfg: MeshConfig, num_devices: int, num_slices: int) -> list[int]:
    """The per-slice ``[data, fsdp, tensor]`` sizes with the one ``-1`` filled in."""
    where = "" if num_slices == 1 else f" per slice ({num_slices} slices)"
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ShardingError(
                f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}: {num_devices} devices{where} do not divide "
                f"by the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ShardingError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices{where}, "
            f"but {num_devices} are available (use -1 for one axis to fill the rest)"
        )
    return sizes


def parse_rules(overrides: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """The rules table as ``{logical: (mesh axes...)}``, with ``logical=axis[+axis]|none`` overrides applied."""
    table: dict[str, tuple[str, ...]] = {}
    for logical, target in DEFAULT_RULES:
        table[logical] = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"mesh rule {item!r} is not of the form logical=mesh_axis")
        logical, target = (s.strip() for s in item.split("=", 1))
        if logical not in table:
            raise ConfigError(
                f"mesh rule {item!r} names unknown logical axis {logical!r}; logical axes: {', '.join(table)}"
            )
        axes = () if target.lower() in ("none", "") else tuple(a.strip() for a in target.split("+"))
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh rule {item!r} names unknown mesh axis {bad[0]!r}; mesh axes: {MESH_AXES}")
        table[logical] = axes
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, tuple[str, ...]],
    name: str = "array",
) -> P:
    """The PartitionSpec for one array from its logical axis names.

    Raises:
      ShardingError: unknown logical name, rank mismatch, or one mesh axis used by two dimensions.
    """
    if len(logical_axes) != len(shape):
        raise ShardingError(f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}")
    spec: list[Any] = []
    used: dict[str, str] = {}
    for logical, size in zip(logical_axes, shape):
        if logical is None:
            spec.append(None)
            continue
        if logical not in rules:
            raise ShardingError(f"{name}: logical axis {logical!r} has no sharding rule; rules: {sorted(rules)}")
        axes = rules[logical]
        for a in axes:
            if a in used:
                raise ShardingError(
                    f"{name}: logical axes {used[a]!r} and {logical!r} both map to mesh axis {a!r} "
                    f"(logical axes {tuple(logical_axes)})"
                )
            used[a] = logical
        # Only the mesh axes with more than one device matter; a size-1 axis never constrains divisibility.
        active = tuple(a for a in axes if mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in active)
        if not active or size % n:
            spec.append(None)  # replicate a dimension the mesh cannot split evenly
        else:
            spec.append(active[0] if len(active) == 1 else active)
    return P(*spec)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as ``a/b/0/c``, skipping nnx ``.value`` attribute keys so nnx.State and pure dicts agree."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_axes_leaf(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def flat_logical_axes(logical_tree: Any) -> dict[str, tuple[str | None, ...]]:
    """``{param path: logical axes}`` from a ``models.logical_axes`` tree (nnx.State or dict, tuples as leaves)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=_is_axes_leaf)
    return {path_str(p): tuple(v) for p, v in flat}


def param_shardings(params: Any, logical_tree: Any, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> Any:
    """A NamedSharding per param leaf (same tree as ``params``), from the logical axes by path."""
    axes_by_path = flat_logical_axes(logical_tree)

    def one(path, leaf):
        key = path_str(path)
        shape = np.shape(leaf)
        if key not in axes_by_path:
            if len(shape) == 0:
                return NamedSharding(mesh, P())
            raise ShardingError(f"param {key!r} has no logical axes; known params: {sorted(axes_by_path)[:8]}...")
        return NamedSharding(mesh, logical_to_spec(axes_by_path[key], shape, mesh, rules, name=key))

    return jax.tree_util.tree_map_with_path(one, params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings_like(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds param-shaped subtrees (optimizer state): derived from the params by path.

    A leaf whose key path ends with a param's path and has that param's shape (Adam's ``mu``/``nu``, momentum
    traces, ...) gets the param's sharding; everything else (counters, FINCH's EMA and lr, factored statistics) is
    replicated.
    """
    by_path: dict[str, tuple[tuple[int, ...], NamedSharding]] = {}
    flat_p, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_s = jax.tree_util.tree_leaves(params_shardings)
    for (p, leaf), s in zip(flat_p, flat_s):
        by_path[path_str(p)] = (tuple(np.shape(leaf)), s)
    rep = replicated(mesh)

    def one(path, leaf):
        parts = path_str(path).split("/")
        shape = tuple(np.shape(leaf))
        # The longest suffix of the leaf's path that names a param.
        for start in range(len(parts)):
            hit = by_path.get("/".join(parts[start:]))
            if hit is not None:
                return hit[1] if hit[0] == shape else rep
        return rep

    return jax.tree_util.tree_map_with_path(one, tree)


def activation_context(mesh: Mesh) -> ShardingContext:
    """The layout of the model's activations on ``mesh`` (:data:`ACTIVATION_RULES`), for
    :func:`models.sharding.activation_sharding`."""

    def spec_for(axes: Sequence[str | None], shape: Sequence[int]) -> P:
        return logical_to_spec(axes, shape, mesh, ACTIVATION_RULES, name="activation")

    return ShardingContext(mesh, spec_for)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches are split along rows over ``data`` × ``fsdp`` and replicated over ``tensor``."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
