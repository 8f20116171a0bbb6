"""Which program to build, decided by the platform it is compiled for.

Every trace-time choice that depends on the target lives here: the compute dtype, the
attention implementation, the matmul precision, and whether the models use their CPU
kernels (``models/cpu_kernels.py``).
The platform comes from the devices the program will run on (the mesh's) or is named
explicitly (``config.platform``, ``dry_run --platform`` / ``--topology``). It never comes
from the host that traces: a CPU host builds, exports and compiles the GPU and TPU programs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
ATTENTION = ("auto", "einsum", "xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# jax.export's names for the platforms
EXPORT_NAMES = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def of_devices(devices) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of ``devices`` (a list, or a mesh's ``devices``)."""
    p = list(getattr(devices, "flat", devices))[0].platform
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def target(config, devices) -> str:
    """``config.platform`` ('auto': the platform of ``devices``, e.g. the mesh's)."""
    name = config.get("platform", "auto")
    return of_devices(devices) if name == "auto" else name


def compute_dtype(name: str, platform: str):
    """``config.model.dtype``: 'auto' is bfloat16 on GPU and TPU, float32 on CPU."""
    if name == "auto":
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return DTYPES[name]


def matmul_precision(platform: str, dtype) -> str:
    """Stated, not left to the backend: on TPU the default precision of a float32 dot is one
    bfloat16 pass, so a float32 program asks for 'highest' there; bfloat16 is 'default'."""
    return "highest" if platform == "tpu" and jnp.dtype(dtype) == jnp.float32 else "default"


def with_precision(fn, precision: str):
    """``fn`` traced under ``jax.default_matmul_precision(precision)``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        ctx = jax.default_matmul_precision(precision) if precision != "default" else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)
    return wrapped


def cpu_kernels(platform: str) -> bool:
    """Whether the models run their CPU kernels (``models/cpu_kernels.py``): only on CPU."""
    return platform == "cpu"


@dataclasses.dataclass(frozen=True)
class Attention:
    """How softmax attention over ``length`` tokens runs: ``impl`` over ``padded`` tokens
    (cuDNN's training kernel needs an even length; the padding is masked)."""
    impl: str            # 'einsum' (layers.softmax_attention), 'xla' (jax.nn.dot_product_attention), 'cudnn'
    length: int
    padded: int
    why: str

    def describe(self) -> str:
        pad = f", padded to {self.padded} (masked)" if self.padded != self.length else ""
        return f"{self.impl} at {self.length} tokens{pad}: {self.why}"


def select_attention(requested: str, platform: str, dtype, length: int, head_dim: int) -> Attention:
    """The attention implementation for one sequence length.

    'auto': cuDNN flash attention on GPU for bfloat16/float16 with a head dim that is a
    multiple of 8 and at most 128 (an odd length is padded by one token and masked: JAX's
    cuDNN training kernel refuses odd lengths); everywhere else the einsum kernel
    (``layers.softmax_attention``): its dots take compute-dtype operands with float32
    accumulation in both passes, where the backward of XLA's form (``jax.nn.
    dot_product_attention``) mixes float32 and bfloat16 operands, which CUDA runs in float32;
    on CPU it is also the faster one. An explicit request is honoured where it can run, else
    a ``ValueError`` names ``config.model.attention``.
    """
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn_ok = platform == "gpu" and low_precision and head_dim % 8 == 0 and head_dim <= 128
    if requested not in ATTENTION:
        raise ValueError(f"config.model.attention={requested!r}: expected one of {ATTENTION}")
    if requested == "cudnn" and not cudnn_ok:
        raise ValueError(
            f"config.model.attention='cudnn' needs a GPU, bfloat16 compute (config.model.dtype) and a "
            f"head dim that is a multiple of 8 up to 128; this program: platform {platform}, "
            f"{jnp.dtype(dtype).name}, head dim {head_dim}. Use 'auto'.")
    if requested in ("einsum", "xla"):
        return Attention(requested, length, length, "as configured")
    if cudnn_ok:
        return Attention("cudnn", length, length + length % 2, "cuDNN flash attention")
    why = ("float32 (cuDNN flash attention takes bfloat16)" if platform == "gpu" and not low_precision
           else f"head dim {head_dim} (cuDNN takes multiples of 8 up to 128)" if platform == "gpu"
           else f"{platform.upper()}: dots in the compute dtype in both passes")
    return Attention("einsum", length, length, why)
