"""Sharding over a device mesh: one rule table from logical axes to mesh axes, and attention per shard.

A mesh has up to two axes, ``data`` (data parallel: the batch) and ``model`` (tensor parallel: query
and KV heads, the MLP hidden dimension, the vocabulary). Every weight names its logical axes beside
its shape (``tmjax.models.params.weight_specs``); the KV cache's are ``CACHE_AXES``. ``RULES`` maps a
logical axis to a mesh axis; any axis it does not name (layers, hidden size, head_dim, sequence) is
replicated. The mesh stays out of ``ModelConfig``: the same config runs on one device or many.

Heads are independent, so attention runs once per shard through ``shard_map`` (``shard_attention``)
on its slice of the batch and heads: each device's query heads stay with the KV heads that serve
them. Everything else is left to XLA's partitioner, which follows the weights' shardings: a mesh
whose axes are ``Explicit`` (``jax.make_mesh``'s default) is used with ``Auto`` axes.

KV heads are never replicated across devices: the ``model`` axis must divide the number of KV heads
(and of query heads, the MLP hidden size and the vocabulary), or ``check_mesh`` refuses the mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, is_spec, weight_specs

DATA = "data"
MODEL = "model"
# logical axis -> mesh axis; logical axes not listed are replicated.
RULES: dict[str, str] = {
    "batch": DATA,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "ffn": MODEL,
    "vocab": MODEL,
}
# The KV cache [L, B, S, Hkv, D] and the attention operands [B, T, H, D].
CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")
_Q_AXES = ("batch", "seq", "q_heads", "head_dim")
_KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
# What each sharded logical axis counts, for the messages of check_mesh.
_AXIS_FIELDS = {"q_heads": "num_heads", "kv_heads": "num_kv_heads", "ffn": "intermediate_size",
                "vocab": "vocab_size"}

AttentionOp = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def spec(axes: tuple[str, ...], mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical ``axes`` on ``mesh`` (rules naming an axis the
    mesh lacks replicate)."""
    return PartitionSpec(*(RULES.get(a) if RULES.get(a) in mesh.axis_names else None for a in axes))


def named(axes: tuple[str, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, mesh))


def check_mesh(config: ModelConfig, mesh: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``mesh`` is a ``jax.sharding.Mesh`` with axes named
    ``data`` and/or ``model`` whose ``model`` size divides every tensor-parallel dimension."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((2, 4), ('data', 'model'))), "
                        f"got {type(mesh).__name__}")
    unknown = [name for name in mesh.axis_names if name not in (DATA, MODEL)]
    if unknown:
        raise ValueError(f"mesh axes must be named {DATA!r} and/or {MODEL!r}, got {mesh.axis_names}")
    ways = dict(mesh.shape).get(MODEL, 1)
    for axis, field in _AXIS_FIELDS.items():
        size = getattr(config, field)
        if size % ways:
            raise ValueError(
                f"mesh: the {MODEL!r} axis ({ways} devices) must divide {field} ({size}); "
                + ("KV heads are not replicated across devices, so " if axis == "kv_heads" else "")
                + f"use a {MODEL!r} axis size that divides {size}"
            )


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """The ``NamedSharding`` of every weight, as a tree shaped like ``param_shapes(config)``, on
    ``mesh`` with ``Auto`` axes."""
    check_mesh(config, mesh)
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return jax.tree.map(lambda s: named(s.axes, auto), weight_specs(config), is_leaf=is_spec)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """``params`` placed on ``mesh`` by the rules (for weights already in memory; ``tmjax.load(path,
    mesh=...)`` restores a checkpoint straight into its shards)."""
    return Params(params.config, jax.device_put(params.weights, param_shardings(params.config, mesh)))


def params_mesh(params: Params) -> Mesh | None:
    """The mesh the weights are sharded over, or None when they are not placed on a mesh of several
    devices. ``ValueError`` when some weights are on a mesh and others are not, or on different ones."""
    leaves = jax.tree.leaves(params.weights)
    meshes = {leaf.sharding.mesh for leaf in leaves
              if isinstance(getattr(leaf, "sharding", None), NamedSharding) and leaf.sharding.mesh.size > 1}
    if not meshes:
        return None
    on_mesh = sum(isinstance(getattr(leaf, "sharding", None), NamedSharding) for leaf in leaves)
    if len(meshes) > 1 or on_mesh != len(leaves):
        raise ValueError("params: some weights are on a different mesh or device than others; "
                         "place them with tmjax.models.sharding.shard_params(params, mesh)")
    (mesh,) = meshes
    return mesh


def batch_multiple(mesh: Mesh | None) -> int:
    """How many rows a batch must be a multiple of on ``mesh`` (the size of its data axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(DATA, 1)


def shard_attention(attend: AttentionOp, mesh: Mesh) -> AttentionOp:
    """``attend(q, k, v, length)`` (q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``, length ``[B]``) run
    once per device on its rows and heads; ``check_mesh`` ensured that every device holds whole GQA
    groups (``Hkv`` divisible by the model axis)."""
    q_spec, kv_spec = spec(_Q_AXES, mesh), spec(_KV_AXES, mesh)
    # check_vma=False: the backends' loops start from constants (zeros) and carry per-shard values,
    # which the varying-axes check rejects although every output is per shard by construction.
    return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec(("batch",), mesh)),
                         out_specs=q_spec, check_vma=False)
