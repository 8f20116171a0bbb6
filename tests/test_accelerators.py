"""The GPU and TPU programs, built and checked on the CPU: the platform decides the program
(``platform.py``), never the host that traces it. The real ViT-B/16 and MViTv2-S pre-training
steps are lowered for CUDA and TPU; the accelerator-flavoured program runs on the CPU and
matches the CPU program."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskfeat_jax import config as config_lib, dry_run, platform, sharding, train

import tiny

BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize("plat,dtype,length,head_dim,impl,padded", [
    ("gpu", BF16, 197, 64, "cudnn", 198),      # ViT-B/16, ViT-L/16 at 224 px: odd, padded and masked
    ("gpu", BF16, 198, 64, "cudnn", 198),
    ("gpu", BF16, 256, 64, "cudnn", 256),
    ("gpu", jnp.float16, 197, 64, "cudnn", 198),
    ("gpu", BF16, 197, 80, "cudnn", 198),      # ViT-H/14: head dim 80
    ("gpu", BF16, 197, 12, "einsum", 197),     # head dim not a multiple of 8
    ("gpu", BF16, 197, 256, "einsum", 197),    # head dim over 128
    ("gpu", F32, 197, 64, "einsum", 197),      # cuDNN flash attention takes bfloat16 / float16
    ("tpu", BF16, 197, 64, "einsum", 197),
    ("tpu", F32, 198, 64, "einsum", 198),
    ("cpu", BF16, 197, 64, "einsum", 197),
    ("cpu", F32, 5, 16, "einsum", 5),
])
def test_auto_attention_for_every_platform_dtype_and_length(plat, dtype, length, head_dim, impl, padded):
    choice = platform.select_attention("auto", plat, dtype, length, head_dim)
    assert (choice.impl, choice.length, choice.padded) == (impl, length, padded)
    assert str(length) in choice.describe()


@pytest.mark.parametrize("requested,plat,dtype,ok", [
    ("cudnn", "gpu", BF16, True), ("cudnn", "gpu", F32, False), ("cudnn", "cpu", BF16, False),
    ("cudnn", "tpu", BF16, False), ("xla", "cpu", F32, True), ("xla", "gpu", BF16, True),
    ("einsum", "tpu", BF16, True), ("flash", "gpu", BF16, False)])
def test_explicit_attention_is_honoured_or_refused_naming_the_key(requested, plat, dtype, ok):
    if ok:
        assert platform.select_attention(requested, plat, dtype, 197, 64).impl == requested
    else:
        with pytest.raises(ValueError, match="config.model.attention"):
            platform.select_attention(requested, plat, dtype, 197, 64)


def test_platform_comes_from_the_devices_or_the_config():
    c = config_lib.base_config()
    assert platform.target(c, jax.devices()) == "cpu"
    assert platform.of_devices(sharding.make_mesh(c.mesh).devices) == "cpu"
    c.platform = "tpu"
    assert platform.target(c, jax.devices()) == "tpu"
    assert platform.compute_dtype("auto", "cpu") == F32
    assert platform.compute_dtype("auto", "gpu") == platform.compute_dtype("auto", "tpu") == BF16
    assert platform.compute_dtype("float32", "tpu") == F32
    assert platform.matmul_precision("tpu", F32) == "highest"
    assert platform.matmul_precision("tpu", BF16) == platform.matmul_precision("gpu", F32) == "default"
    c.platform = "ipu"
    with pytest.raises(ValueError, match="config.platform='ipu'"):
        config_lib.validate(c, 8)


def _pretrain_config(name, variant):
    """Real-size pre-training at 224 px, batch 8, on generated data (lowered, never run)."""
    c = config_lib.base_config()
    c.model.name, c.model.variant = name, variant
    c.input.dataset = "video_demo" if name == "mvit" else "synthetic"
    c.input.global_batch_size = 8
    return c


# the tiny ViT pre-training on generated data (with base_config's classes: pre-training has no classifier)
TINY = {"input.dataset": "synthetic", "model.num_classes": 1000}


# a conditional with one result is the CPU cotangent boundary (it returns its cotangent); the
# step's non-finite guard returns the whole train state
_BOUNDARY = re.compile(r'%[\w#]+ = "stablehlo\.case"')


def _assert_accelerator_program(text):
    s = dry_run.program_summary(text)
    assert not _BOUNDARY.search(text), "a CPU-only conditional in an accelerator program"
    assert s["scatters"] == 0, s          # HOG's histogram and MViTv2's additions are scatter-free
    assert s["dots"] and set(s["dots"]) == {"bf16 x bf16"}, s["dots"]   # no mixed or float32 dot
    return s


@pytest.mark.parametrize("plat", ["gpu", "tpu"])
@pytest.mark.parametrize("name,variant", [("vit", "B/16"), ("mvit", "S")])
def test_real_pretraining_steps_lower_for_cuda_and_tpu(name, variant, plat):
    """ViT-B/16 and MViTv2-S pre-training at 224 px, bfloat16 by default, default attention,
    over the 8-device mesh: they lower for the platform with no CPU-only op, no scatter, and
    every dot in bfloat16 (float32 accumulation)."""
    c = _pretrain_config(name, variant)
    st, text = dry_run.lower_step(c, sharding.make_mesh(c.mesh), plat)
    _assert_accelerator_program(text)
    assert train.describe_program(st.model, c, plat).startswith(f"program: {plat}, compute bfloat16")
    if name == "vit":
        assert st.model.encoder.attention.impl == ("cudnn" if plat == "gpu" else "einsum")
        assert st.model.encoder.attention.padded == (198 if plat == "gpu" else 197)


def test_vit_b_cuda_step_exports_with_cudnn_flash_attention():
    """Through ``jax.export`` (serialisable) on one device: the attention the selector chose,
    cuDNN's forward and backward kernels on 198 tokens (197 padded and masked)."""
    c = _pretrain_config("vit", "B/16")
    st, text = dry_run.lower_step(c, sharding.make_mesh(c.mesh, jax.devices()[:1]), "gpu", export=True)
    s = _assert_accelerator_program(text)
    depth = st.model.encoder.size.depth
    assert text.count("@__cudnn$fmhaSoftmaxBackward") == depth
    assert s["cudnn_attention_calls"] >= 2 * depth
    assert re.search(r"__cudnn\$fmhaSoftmax\(.*tensor<8x198x12x64xbf16>", text)


def test_the_cpu_program_keeps_its_cpu_kernels():
    """The counter-check: the CPU program of the same step has the boundary conditionals."""
    c = tiny.config(overrides=TINY)
    _, text = dry_run.lower_step(c, sharding.make_mesh(c.mesh), "cpu")
    assert len(_BOUNDARY.findall(text)) == 2 + 1            # before each of the 2 blocks and at the output
    assert dry_run.program_summary(text)["scatters"] > 0    # HOG's scatter histogram, faster on CPU


def _one_step(c, plat):
    with c.unlocked():
        c.platform = plat
    mesh = sharding.make_mesh(c.mesh)
    st = train.setup(c, mesh, steps_per_epoch=1, total_steps=10)
    b, n = c.input.global_batch_size, int(np.prod(st.model.encoder.grid))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (b, c.input.image_size, c.input.image_size, 3), dtype=np.uint8),
             "label": np.zeros(b, np.int32), "valid": np.ones(b, bool),
             "mask": rng.random((b, n)) < 0.4}
    batch = sharding.global_batch(mesh, batch)
    state = st.init()
    _, metrics = train.jit_step(st, mesh, batch)(state, batch)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.parametrize("plat,attention", [("gpu", "auto"), ("tpu", "auto"), ("gpu", "xla")])
def test_accelerator_program_on_cpu_matches_the_cpu_program(plat, attention):
    """The GPU/TPU-flavoured step (no boundary, 4-D projections, scatter-free HOG, TPU's
    'highest' float32 precision; XLA's attention when asked) run on the CPU against the CPU
    program on the same parameters and batch, in float32: loss and grad norm to 1e-5."""
    c = tiny.config(overrides=TINY)
    c.model.dtype, c.model.attention = "float32", attention
    cpu, acc = _one_step(c.copy_and_resolve_references(), "cpu"), _one_step(c, plat)
    for key in ("train/loss", "opt/grad_norm"):
        assert acc[key] == pytest.approx(cpu[key], rel=1e-5), key
    assert cpu["train/loss"] > 0 and cpu["opt/grad_norm"] > 0


def test_dry_run_lowers_for_another_platform_and_says_so():
    c = tiny.config(overrides=TINY)
    r = dry_run.run_lowered(c, "tpu")
    text = dry_run.format_export(r)
    assert text.startswith("lowered for tpu over 8 devices") and "no memory figures" in text
    assert "program: tpu, compute bfloat16" in text and r["scatters"] == 0
    r = dry_run.run(c)
    assert r["program"].startswith("program: cpu, compute float32") and "CPU kernels" in r["program"]
    assert "compiled for cpu" in dry_run.format_report(r)


def test_mvit_accelerator_form_matches_the_cpu_form():
    """MViTv2 'mu' on a small clip: the GPU/TPU program's XLA convolutions (patch embedding,
    q/k/v pooling) against the CPU program's tap sums, same parameters, values and gradients."""
    from flax import nnx
    from maskfeat_jax.models import mvit
    x = jax.random.normal(jax.random.key(1), (2, 4, 32, 32, 3))
    outs = []
    for plat in ("cpu", "gpu"):
        with nnx.use_eager_sharding(False):
            model = mvit.MViT(variant="mu", num_frames=4, image_size=32, platform=plat, rngs=nnx.Rngs(0))
        gd, params = nnx.split(model)
        loss = lambda p: jnp.sum(nnx.merge(gd, p)(x)["tokens_BxNxD"] ** 2)   # noqa: E731
        outs.append(jax.jit(jax.value_and_grad(loss))(params))
    (cpu_v, cpu_g), (acc_v, acc_g) = outs
    np.testing.assert_allclose(acc_v, cpu_v, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(cpu_g))
    for a, b in zip(jax.tree.leaves(acc_g), jax.tree.leaves(cpu_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
