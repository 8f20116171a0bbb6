"""Device mesh, logical-axis rules and sharding helpers.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``...). One
rules table maps them to the mesh axes ``data``, ``fsdp`` and ``tensor``; the
strategy is chosen by the mesh shape alone:

* data parallel: ``mesh.data=-1`` (default), ``fsdp=1``, ``tensor=1``;
* FSDP: ``mesh.fsdp=N``: parameters and optimizer state split over ``fsdp``;
* FSDP + tensor parallel: ``mesh.tensor=M`` also splits heads and MLP.

Axes of size 1 make the corresponding rules no-ops, so one table serves all.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes); a name not listed is replicated.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),       # model width: FSDP shards weights along it
    ("mlp", "tensor"),       # MLP hidden units
    ("heads", "tensor"),     # attention heads
    ("kv", None),            # per-head features
    ("classes", "tensor"),   # classifier / target outputs
    ("length", None),        # token axis of activations
    ("conv_in", None),       # input channels / kernel taps of patch embeddings
    # activations: the batch is split over data and fsdp, so their width is not
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


def mesh_shape(config_mesh, num_devices: int) -> tuple[int, int, int]:
    """Resolves the ``mesh`` config group (one entry may be -1) to a shape."""
    shape = [int(config_mesh[a]) for a in MESH_AXES]
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape) or num_devices % known:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} does not fit {num_devices} devices "
            f"(the product of the axes must equal the device count)")
    shape = [num_devices // known if s == -1 else s for s in shape]
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, "
            f"but {num_devices} are available; set one axis to -1 to absorb the rest")
    return tuple(shape)


def make_mesh(config_mesh, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config_mesh, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules():
    """The logical axis rules as a Flax context manager."""
    return nnx.logical_axis_rules(LOGICAL_RULES)


def logical_to_spec(names) -> P:
    table = dict(LOGICAL_RULES)
    return P(*(table.get(n) if n is not None else None for n in names))


def constrain(x, names):
    """Constrains an activation's sharding by logical names (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh, local: dict) -> dict:
    """Assembles global arrays from this process's slice of the batch."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


def bytes_per_device(tree) -> int:
    """Bytes that the largest shard of each array occupies on one device, summed."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard_shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") and x.sharding else x.shape
        total += int(np.prod(shard_shape)) * np.dtype(x.dtype).itemsize
    return total


def abstract_batch(config, mesh, grid) -> dict:
    """ShapeDtypeStructs of one global training batch, sharded as ``global_batch``.

    ``grid``: the mask's token grid (``encoder.grid`` for ViT, ``encoder.mask_grid`` for MViT)."""
    b, s = config.input.global_batch_size, config.input.image_size
    from maskfeat_jax.config_validate import is_video
    video = is_video(config)
    frames = (config.video.num_frames,) if video else ()
    shapes = {"image": ((b, *frames, s, s, 3), np.uint8), "label": ((b,), np.int32), "valid": ((b,), np.bool_)}
    if config.task == "pretrain":
        shapes["mask"] = ((b, int(np.prod(grid))), np.bool_)
    else:
        shapes["erase_box"] = ((b, 4), np.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}
