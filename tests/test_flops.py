"""Analytic FLOPs against a hand count, and the start-up summary's model figures."""
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, models, perf


def _abstract(task, variant, classes=1000):
    c = config_lib.base_config()
    c.task, c.model.variant, c.model.num_classes = task, variant, classes
    return c, models.build_abstract(c)


def test_vit_b16_forward_flops_match_a_hand_count():
    # multiply-adds of one 224x224 image through ViT-B/16, layer by layer
    n, d, mlp, depth = 197, 768, 3072, 12
    patch_embed = 196 * (16 * 16 * 3) * d
    per_block = n * d * 3 * d + n * n * d + n * n * d + n * d * d + n * d * mlp + n * mlp * d
    head = d * 1000                          # the classifier on the pooled vector
    hand_macs = patch_embed + depth * per_block + head
    assert hand_macs / 1e9 == pytest.approx(17.58, abs=0.02)     # the usual "17.6 GMACs" of ViT-B/16
    c, model = _abstract("finetune", "B/16")
    assert perf.model_flops_per_image(model, c) / 3 / 2 == pytest.approx(hand_macs, rel=0.05)


def test_vit_b16_classifier_has_86_6_million_parameters():
    import jax
    import numpy as np
    _, model = _abstract("finetune", "B/16")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    assert n == pytest.approx(86.6e6, rel=0.01)
