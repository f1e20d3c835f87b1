"""Device mesh and the one table of parameter shardings, shared by every role.

jaxppo never writes communication by hand: arrays carry ``NamedSharding``s on a mesh with three
named axes and XLA's SPMD partitioner inserts the collectives.

* ``data``   — pure data parallelism: the batch is split, parameters are replicated;
* ``fsdp``   — fully-sharded data parallelism (ZeRO-3): the batch is split *and* every large
  parameter (and its optimizer moments) is split along its model dimension ``D``; XLA gathers a
  layer's weights when the layer runs;
* ``tensor`` — tensor (model) parallelism (Megatron): attention heads, the MLP hidden dimension
  and the vocabulary are split, so activations are split along them inside a layer.

:data:`RULES` maps parameter-path patterns to ``PartitionSpec``s. It is matched against the
``/``-joined path of every array of a pytree (``layers/attn/qkv_proj/kernel``, and the same names
inside optimizer states, e.g. ``opt_state/.../mu/layers/attn/qkv_proj/kernel``), first match wins,
so the actor, critic, reference and reward model and their optimizer states all get their
layout from this one table. A rule whose rank does not match the array, or an axis that does not
divide its dimension, falls back to replicating that dimension.

Batches are split on their leading dimension over ``(data, fsdp)`` (:func:`batch_spec`); the
sampler's KV cache ``[L, B, H_kv, S, D_h]`` is split the same way on ``B`` and over ``tensor`` on
``H_kv`` (:data:`KV_CACHE_SPEC`), consistent with the attention projections.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` (TPU pods and
SLURM/Open MPI clusters are detected by JAX; elsewhere give the coordinator address, process count
and id); :func:`host_to_global` builds a global array from identical host data on every process,
each process materialising only its own devices' slices; :func:`to_host` gathers a global array
back to every process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxppo.config import require

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (path regex, spec). Kernels are [in, out]; stacked layers carry a leading L axis (never split).
RULES: tuple[tuple[str, P], ...] = (
    (r"embed/embedding$", P("tensor", "fsdp")),  # [V, D]: vocabulary over tensor
    # [L, D, H_kv, G + 2, Dh]: KV heads (each with its query heads) over tensor
    # a quantised base (jaxppo.quant): the codes as the kernel (NF4's input axis halved), the scales like the
    # kernel's output (their input axis, 1 or d_in / block, never split)
    (r"layers/attn/qkv_proj/kernel(_int8|_nf4)?$", P(None, "fsdp", "tensor", None, None)),
    (r"layers/attn/qkv_proj/kernel_scale$", P(None, None, "tensor", None, None)),
    (r"layers/attn/qkv_proj/bias$", P(None, "tensor", None, None)),  # [L, H_kv, G + 2, Dh]
    (r"layers/attn/o_proj/kernel(_int8|_nf4)?$", P(None, "tensor", "fsdp")),  # [L, H·Dh, D]
    (r"layers/mlp/gate_up_proj/kernel(_int8|_nf4)?$", P(None, "fsdp", None, "tensor")),  # [L, D, 2, F]
    (r"layers/mlp/gate_up_proj/kernel_scale$", P(None, None, None, "tensor")),
    (r"layers/mlp/down_proj/kernel(_int8|_nf4)?$", P(None, "tensor", "fsdp")),  # [L, F, D]
    (r"layers/(attn/o|mlp/down)_proj/kernel_scale$", P(None, None, "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(reward_head|value_head)/kernel$", P("fsdp", None)),  # [D, 1]
    # LoRA adapters (jaxppo.lora): A split like its kernel's input, B like its kernel's output, so x A B lands
    # in the projection's output layout; the rank is never split
    (r"lora/layers/attn/[qkv]_a$", P(None, "fsdp", None)),  # [L, D, r]
    (r"lora/layers/attn/[qkv]_b$", P(None, None, "tensor", None, None)),  # [L, r, H_kv, n, Dh]
    (r"lora/layers/attn/o_a$", P(None, "tensor", None)),  # [L, H·Dh, r]
    (r"lora/layers/mlp/(gate|up)_a$", P(None, "fsdp", None)),  # [L, D, r]
    (r"lora/layers/mlp/(gate|up)_b$", P(None, None, None, "tensor")),  # [L, r, 1, F]
    (r"lora/layers/mlp/down_a$", P(None, "tensor", None)),  # [L, F, r]
    (r"lora/layers/(attn/o|mlp/down)_b$", P(None, None, "fsdp")),  # [L, r, D]
    (r".*", P()),  # norms, biases of heads, step counters, KL controller: replicated
)
KV_CACHE_SPEC = P(None, BATCH_AXES, "tensor", None, None)  # [L, B, H_kv, S_max, D_h]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the device mesh's axes; their product is the number of devices (one may be -1: the rest)."""

    data: int = 1  # data-parallel replicas (batch split, params replicated)
    fsdp: int = 1  # fully-sharded data parallel (batch and params split)
    tensor: int = -1  # tensor parallel (heads, MLP width, vocabulary split); -1: all remaining devices

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in AXES}
        for name, size in sizes.items():
            require(size >= 1 or size == -1, f"mesh.{name}", f"must be >= 1 or -1 (the rest), got {size}")
        free = [name for name, size in sizes.items() if size == -1]
        require(len(free) <= 1, f"mesh.{free[-1]}" if free else "mesh", "at most one axis may be -1")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The axis sizes for ``num_devices`` devices, -1 resolved.

        A ValueError names the axis at fault (``mesh.data`` / ``mesh.fsdp`` / ``mesh.tensor``): the first
        whose size, times the fixed sizes before it, does not divide ``num_devices``; else, when the fixed
        sizes multiply to fewer devices than there are and no axis is -1, ``mesh.data``. :func:`make_mesh`
        calls it before anything runs on the devices.
        """
        sizes = {name: getattr(self, name) for name in AXES}
        product = 1
        for name, size in sizes.items():
            if size != -1:
                product *= size
                require(num_devices % product == 0, f"mesh.{name}",
                        f"axis sizes {sizes} do not divide the {num_devices} devices (the fixed axes up to "
                        f"`{name}` multiply to {product})")
        if -1 in sizes.values():
            return tuple(num_devices // product if size == -1 else size for size in sizes.values())
        require(product == num_devices, "mesh.data", f"axis sizes {sizes} multiply to {product}, but there are "
                f"{num_devices} devices (set one axis to -1 to take the rest)")
        return tuple(sizes.values())


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all processes).

    Axes are ``AxisType.Auto``: arrays carry shardings and XLA propagates them (no explicit-mode typing).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def reserve_cpu_collective_threads(environ=os.environ) -> int | None:
    """Give XLA:CPU's thread pool enough threads that collectives between a process's own CPU devices
    cannot starve each other; call before JAX starts its CPU backend. Returns the pool size set (None:
    one CPU device, or already chosen through ``PJRT_NPROC``).

    XLA:CPU runs a program on several local devices as one thunk executor per device, and hands
    independent ready thunks to one shared intra-op pool, ``PJRT_NPROC`` threads (default: the
    number of cores). A collective thunk blocks its thread until every device has reached it, and
    collectives are only *launched* in program order, so one device can occupy every pool thread with
    collectives that wait for a device that has no thread left to run on: a deadlock that XLA ends
    after its 40 s rendezvous timeout by aborting the process. On a 2-core machine two small programs
    with independent all-reduces over 2 devices deadlocked within their first calls, every time
    (tests/e2e/test_multi_device.py runs them); with 8 threads per device they never did. Idle threads cost
    nothing: a jitted matmul on one device ran as fast with 64 pool threads as with 2 (within noise,
    this 2-core machine, Nov 2026).

    The device count comes from ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or
    ``jax_num_cpu_devices``, the two ways to ask for several CPU devices.
    """
    if "PJRT_NPROC" in environ:
        return None
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    devices = max(int(flag.group(1)) if flag else 1, jax.config.jax_num_cpu_devices)
    if devices <= 1:
        return None
    threads = max(os.cpu_count() or 1, 8 * devices)
    environ["PJRT_NPROC"] = str(threads)
    return threads


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """The rule's spec for the array ``name`` of ``shape``, made valid for it on ``mesh``."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            break
    else:
        return P()
    if len(spec) != len(shape):
        return P()
    return _fit_spec(spec, shape, mesh)


def _fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
    """``spec`` in canonical form for ``shape`` on ``mesh``: mesh axes of size 1 and axes that do not
    divide their dimension dropped, trailing Nones stripped — the form XLA gives outputs back in, so a
    state's sharding is the same object before and after a jitted step (no second compilation)."""
    fixed = []
    for dim, axes in zip(shape, spec):
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in names)
        fixed.append(None if not names or dim % size else names[0] if len(names) == 1 else names)
    while fixed and fixed[-1] is None:
        fixed.pop()
    return P(*fixed)


def tree_shardings(tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """``NamedSharding``s for every array leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s) by :data:`RULES`."""
    def one(path, leaf):
        shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
        return NamedSharding(mesh, spec_for(_path_name(path), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_tree(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed on ``mesh`` by :data:`RULES` (host or device arrays; global arrays are resharded)."""
    shardings = tree_shardings(tree, mesh)
    return jax.tree.map(_place, tree, shardings)


def init_sharded(init_fn, mesh: Mesh, *args) -> Any:
    """``init_fn(*args)`` evaluated under ``jit`` with its outputs created already sharded by :data:`RULES`.

    The shapes come from ``jax.eval_shape``, so no device ever holds the whole unsharded tree.
    """
    abstract = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=tree_shardings(abstract, mesh))(*args)


def batch_spec(ndim: int) -> P:
    """Leading (batch) dimension split over ``(data, fsdp)``; the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` split on its leading dimension over ``(data, fsdp)`` (replicated when
    that dimension is not divisible by ``data × fsdp``, e.g. the last, smaller chunk of a dataset)."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]

    def one(x):
        spec = batch_spec(np.ndim(x)) if np.ndim(x) and np.shape(x)[0] % split == 0 else P()
        return _place(x, NamedSharding(mesh, _fit_spec(spec, np.shape(x), mesh)))

    return jax.tree.map(one, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, P())), tree)


def _place(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard on device
    return host_to_global(x, sharding)


def host_to_global(x, sharding: NamedSharding) -> jax.Array:
    """A global array from host data that is the same on every process; each process copies only
    the slices its own devices hold (with one process this is ``jax.device_put``)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _current_mesh():
    """The mesh set by :func:`jax.set_mesh` when it has jaxppo's axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(AXES) <= set(mesh.axis_names) else mesh


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """``with_sharding_constraint`` under the mesh set by :func:`jax.set_mesh`; a no-op without one.

    Lets model code state layouts (the KV cache) without taking a mesh argument: on one device,
    or when the caller set no mesh, nothing changes.
    """
    mesh = _current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, _fit_spec(spec, x.shape, mesh))


def batch_shards() -> int:
    """How many ways the batch axis is split under the current mesh (``data × fsdp``); 1 without one."""
    mesh = _current_mesh()
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain_tree(tree: Any, rules=RULES) -> Any:
    """Every array of ``tree`` constrained to its :data:`RULES` layout under the current mesh (a
    no-op without one). Jitted steps apply it to the states they return, so a donated state comes
    back in the layout it went in with and the step is not traced again."""
    mesh = _current_mesh()
    if mesh is None:
        return tree

    def one(path, x):
        return jax.lax.with_sharding_constraint(x, spec_for(_path_name(path), x.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays resident on each device (from the arrays' actual shards)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for multi-host runs; nothing for a single process.

    Arguments fall back to the environment: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of them set but
    ``JAXPPO_DISTRIBUTED=auto``, JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI).
    On CPU the cross-process collectives use gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    auto = env.get("JAXPPO_DISTRIBUTED") == "auto"
    if coordinator is None and num_processes is None and process_id is None and not auto:
        return
    if jax.config.jax_platforms in (None, "", "cpu") and not auto:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
