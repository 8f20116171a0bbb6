"""Analytic FLOPs and parameter counts against hand counts and the compiler, the Throughput /
MFU arithmetic, and the numerics of the speed-motivated compute paths in ``models.layers``."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, metrics, models, perf, sharding, train
from maskfeat_jax.models import cpu_kernels, layers, mvit


def _config(task="finetune", variant="B/16", size=224, classes=1000):
    c = config_lib.base_config()
    c.task, c.model.variant, c.input.image_size, c.model.num_classes = task, variant, size, classes
    return c




def _compiler_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_vit_b16_forward_flops_match_a_hand_count():
    # ViT-B/16 at 224: 14 x 14 = 196 patches + cls = 197 tokens, width 768, MLP 3072, 12 blocks.
    n, d, m, depth, patch_dim, classes = 197, 768, 3072, 12, 16 * 16 * 3, 1000
    embed = 2 * 196 * patch_dim * d                   # patch projection (a 16x16 stride-16 conv)
    qkv = 2 * n * d * (3 * d)
    scores = 2 * n * n * d                             # q k^T over all heads (H * hd = d)
    mix = 2 * n * n * d                                # softmax(.) v
    proj = 2 * n * d * d
    mlp = 2 * n * d * m + 2 * n * m * d
    head = 2 * d * classes                             # linear classifier on the pooled token
    hand = embed + depth * (qkv + scores + mix + proj + mlp) + head
    assert 35.0e9 < hand < 35.3e9                      # ~17.6 GMACs, the figure usually quoted
    analytic = perf.forward_flops_per_image(models.build_abstract(_config()))
    assert analytic == pytest.approx(hand, rel=0.05)


def test_vit_b16_classifier_has_86_6m_parameters():
    model = models.build_abstract(_config())
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    assert n == pytest.approx(86.6e6, rel=0.01)


def test_training_flops_are_three_forwards_less_the_pixel_gradient():
    model = models.build_abstract(_config("pretrain"))
    fwd = perf.forward_flops_per_image(model)
    _, embed = perf.encoder_flops(model.encoder)
    assert perf.model_flops_per_image(model, None) == pytest.approx(3 * fwd - embed)
    assert 2 * 196 * 768 * 768 == pytest.approx(embed)


def test_analytic_step_flops_match_the_compiler_for_a_small_train_step():
    # Wide enough that matmuls dominate the compiler's count (which also has norms, softmax,
    # HOG and the optimizer), small enough to compile in seconds.
    c = _config("pretrain", "Ti/16", 64)
    c.input.global_batch_size = 8
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    st = train.setup(c, mesh, steps_per_epoch=10, total_steps=100)
    batch = {"image": jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.uint8),
             "mask": jax.ShapeDtypeStruct((8, 16), jnp.bool_), "valid": jax.ShapeDtypeStruct((8,), jnp.bool_)}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
             for k, v in batch.items()}
    with jax.set_mesh(mesh):
        compiled = jax.jit(st.step_fn).lower(st.abstract_state, batch).compile()
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = perf.model_flops_per_image(st.model, c) * 8
    assert analytic == pytest.approx(xla, rel=0.2), (analytic, xla)


@pytest.mark.parametrize("num_frames,size", [(4, 32), (None, 32)])
def test_mvit_forward_flops_match_the_compiler(num_frames, size):
    with nnx.use_eager_sharding(False):
        enc = nnx.eval_shape(lambda: mvit.MViT(variant="mu", num_frames=num_frames, image_size=size,
                                               rngs=nnx.Rngs(0)))
    gd, state = nnx.split(enc)
    shape = (2, size, size, 3) if num_frames is None else (2, num_frames, size, size, 3)
    xla = _compiler_flops(lambda s, x: nnx.merge(gd, s)(x)["tokens_BxNxD"], state,
                          jax.ShapeDtypeStruct(shape, jnp.float32)) / 2
    fwd, embed = perf.encoder_flops(enc)
    assert fwd == pytest.approx(xla, rel=0.15), (fwd, xla)
    kt = 3 if num_frames else 1
    assert embed == 2 * np.prod(enc.patch_grid) * kt * 7 * 7 * 3 * 16


def test_model_flops_dispatch_on_the_encoder_type():
    with nnx.use_eager_sharding(False):
        enc = nnx.eval_shape(lambda: mvit.MViT(variant="mu", num_frames=4, image_size=32, rngs=nnx.Rngs(0)))
        model = nnx.eval_shape(lambda: models.heads.MaskFeat(enc, enc.size.width, 108, rngs=nnx.Rngs(1)))
    fwd, embed = perf.mvit_encoder_flops(model.encoder)
    head = 2 * np.prod(enc.grid) * enc.size.width * 108
    assert perf.forward_flops_per_image(model) == pytest.approx(fwd + head)
    assert perf.model_flops_per_image(model, None) == pytest.approx(3 * (fwd + head) - embed)


def test_throughput_mark_arithmetic(monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr(metrics.time, "time", lambda: clock["t"])
    meter = metrics.Throughput(images_per_step=64, flops_per_image=1e9, num_devices=4, peak_flops=1e12)
    assert meter.mark(10) == {}                      # the first read only starts the clock
    clock["t"] += 8.0                                # 20 steps of 64 images in 8 s
    meter.data_wait = 2.0
    out = meter.mark(30)
    assert out["perf/images_per_sec"] == pytest.approx(160.0)
    assert out["perf/step_seconds"] == pytest.approx(0.4)
    assert out["perf/data_wait_fraction"] == pytest.approx(0.25)
    # 160 img/s * 1 GFLOP / 4 devices = 40 GFLOP/s per device = 0.04 TFLOP/s; MFU 4%
    assert out["perf/tflops_per_device"] == pytest.approx(0.04)
    assert out["perf/mfu"] == pytest.approx(0.04)
    assert meter.data_wait == 0.0
    clock["t"] += 1.0
    assert meter.mark(30) == {}                      # no new step since the last read


# ---- numerics of the compute paths chosen for speed (layers.py)

def test_gelu_is_the_exact_gelu():
    x = jnp.linspace(-12.0, 12.0, 4001)
    np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6, rtol=1e-6)
    g = jax.vmap(jax.grad(layers.gelu))(x)
    np.testing.assert_allclose(g, jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=2e-6)


def test_cotangent_boundary_is_the_identity_in_both_passes():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    f = lambda x: jnp.sin(cpu_kernels.cotangent_boundary(x * 3.0)).sum()   # noqa: E731
    ref = lambda x: jnp.sin(x * 3.0).sum()                             # noqa: E731
    np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(ref)(x))


def test_cotangent_boundary_passes_non_finite_cotangents_through():
    # The boundary's predicate reads the first element; a NaN there takes the other branch.
    x = jnp.ones((3, 4))
    w = jnp.ones((3, 4)).at[0, 0].set(jnp.nan).at[1, 2].set(jnp.inf)
    g = jax.grad(lambda x: (cpu_kernels.cotangent_boundary(x) * w).sum())(x)
    np.testing.assert_array_equal(g, w)


def test_bfloat16_einsum_matches_float32_in_value_and_gradient():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (4, 7, 16)), jax.random.normal(kw, (16, 3, 2, 8)) * 0.25
    g = jax.random.normal(kg, (4, 7, 3, 2, 8))
    spec = "bnd,dthk->bnthk"
    out, vjp = jax.vjp(lambda a, b: layers.einsum(spec, a, b, jnp.bfloat16), x, w)
    ref, vjp_ref = jax.vjp(lambda a, b: layers.einsum(spec, a, b, jnp.float32), x, w)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=0.03, atol=0.03)
    for a, b in zip(vjp(g), vjp_ref(g)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.03, atol=0.05 * float(jnp.abs(b).max()))


def test_bfloat16_dots_take_bfloat16_operands_in_both_passes():
    """The fast CPU path: every dot of a bf16 layer's forward and backward is bf16 x bf16 -> f32."""
    with nnx.use_eager_sharding(False):
        dense = layers.Dense(16, 32, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    gd, state = nnx.split(dense)
    loss = lambda s, x: jnp.square(nnx.merge(gd, s)(x).astype(jnp.float32)).sum()   # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, jnp.ones((8, 16))).as_text()
    dots = re.findall(r"stablehlo.dot_general[^\n]*\((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", hlo)
    assert len(dots) == 3, hlo
    for lhs, rhs, out in dots:
        assert "bf16" in lhs and "bf16" in rhs and "f32" in out, (lhs, rhs, out)


def test_deep_vit_backward_does_not_recompute_the_residual_gradient():
    """Guards the XLA CPU fusion problem ``cotangent_boundary`` fixes: without it every fusion that
    reads a block's gradient recomputes the chain from the loss, so its operand count grows with depth."""
    c = _config("pretrain", "mu/16", 32)
    from maskfeat_jax.models import vit
    vit.SIZES["mu8"] = vit.ViTSize(32, 8, 2, 64)
    try:
        c.model.variant = "mu8/16"
        with nnx.use_eager_sharding(False):
            model = models.build(c, nnx.Rngs(0))
    finally:
        del vit.SIZES["mu8"]
    gd, state = nnx.split(model)
    x, m = jnp.ones((2, 32, 32, 3)), jnp.zeros((2, 4), bool)
    loss = lambda s: jnp.square(nnx.merge(gd, s)(x, m)["pred_BxNxK"]).mean()   # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    operands = [f.group(1).count("%") for f in re.finditer(r"= \S+ fusion\(([^\n]*?)\), kind=", hlo)]
    assert max(operands) < 40, max(operands)


def test_optimizer_benchmark_runs_and_prints_every_update():
    """``benchmarks/optimizer.py`` on the tiny model: one row per guard, each with a time."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "optimizer.py"), "--variant", "mu/16",
                          "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
            if line.split() and line.split()[0] in ("cond", "where", "unguarded")}
    assert set(rows) == {"cond", "where", "unguarded"}, out.stdout
    assert all(float(r[0]) > 0 for r in rows.values())


def test_dots_benchmark_runs_and_rejects_an_unknown_option_set():
    """``benchmarks/dots.py`` on the tiny model: a rate per computation and library; a bad set is named."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "dots.py")
    out = subprocess.run([sys.executable, script, "--variant", "mu/16", "--rounds", "1", "--options", "eigen",
                          "--square", "256", "--settle", "0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("qkv", "fc2", "attention", "square"))]
    assert len(rows) == 7 and all(float(v) > 0 for r in rows for v in r[-3:]), out.stdout
    bad = subprocess.run([sys.executable, script, "--options", "mkl"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "'mkl'" in bad.stderr


@pytest.mark.parametrize("kind,expected", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12)])
def test_peak_flops_come_from_the_device_kind_unless_overridden(kind, expected, monkeypatch):
    class Device:
        device_kind = kind
    monkeypatch.setattr(perf.jax, "devices", lambda: [Device()])
    assert perf.peak_flops_per_device() == (expected, f"table ({kind})")
    assert perf.peak_flops_per_device(123e12) == (123e12, "config")


def test_peak_flops_on_cpu_are_measured_per_device(monkeypatch):
    monkeypatch.setattr(perf, "measured_matmul_flops", lambda **kw: 8e11)
    peak, source = perf.peak_flops_per_device()
    assert source == "measured matmul (cpu)" and peak == 8e11 / len(jax.local_devices())
