"""Action detection on MViTv2: the encoder's last feature map pooled per person box (AVA).

The official MViT detection model (PySlowFast ``MViT`` with ``DETECTION.ENABLE``, its head
``head_helper.ResNetRoIHead``; facts read from its source, the code is written here):

1. the encoder's tokens through the final LayerNorm (``fc_norm`` here, the official ``norm``),
   cls dropped, as a ``(B, T', H', W', C)`` map;
2. averaged over time (``AvgPool3d`` over all ``T'``);
3. RoIAlign of every box to ``resolution x resolution`` (``ROI_XFORM_RESOLUTION`` 7) at spatial
   scale ``1 / stride`` (``stride``: input pixels per feature-map cell; 32 for the fine-tuning
   MViTv2, whose last stage is strided), ``sampling_ratio=0``, ``aligned=True``
   (:func:`roi_align.roi_align`);
4. max-pooled over the ``resolution x resolution`` bins;
5. dropout (``MODEL.DROPOUT_RATE``, 0.5 in the AVA configs), then a Linear to the 80 classes
   (``head``, the official ``head.projection``; scaled by 0.001 at init as the classifier's).

The loss is a sigmoid binary cross-entropy per box and class (``MODEL.LOSS_FUNC: bce`` on
``HEAD_ACT: sigmoid`` outputs) and the scores are the sigmoids (``steps_detection``).

Boxes are ``x1 y1 x2 y2`` in the pixels of the model's input (the crop), as the data maps give
them; :func:`pool_boxes` maps them onto the feature map. The parameters are named as the classifier's (``encoder``,
``fc_norm``, ``head``), so a fine-tuned classifier's tree and a detector's differ only in the
head's width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskfeat_jax.models.heads import dropout as head_dropout
from maskfeat_jax.models.layers import Dense, LayerNorm
from maskfeat_jax.models.roi_align import roi_align

RESOLUTION = 7        # DETECTION.ROI_XFORM_RESOLUTION


def feature_stride(image_size: int, grid) -> float:
    """Input pixels per feature-map cell: ``image_size / W'`` of the encoder's ``grid = (T', H', W')``
    (square inputs; the official ``DETECTION.SPATIAL_SCALE_FACTOR``)."""
    if image_size % grid[1] or image_size % grid[2] or grid[1] != grid[2]:
        raise ValueError(f"an input of {image_size} pixels does not map evenly onto the {grid[1:]} feature map")
    return float(image_size // grid[2])


def pool_boxes(map_BxHxWxC, boxes_BxRx4, stride: float, resolution: int = RESOLUTION):
    """``(B, R, C)``: each box's RoIAlign (``resolution`` bins a side, adaptive sampling, aligned)
    on its own example's map, at spatial scale ``1 / stride`` (box pixel ``x`` is feature-map
    coordinate ``x / stride - 0.5`` in the pixel-centre convention), max-pooled over the bins.
    Per example (``vmap``), so a batch sharded over devices stays where it is."""
    def one(map_HxWxC, boxes_Rx4):
        rois = jnp.concatenate([jnp.zeros_like(boxes_Rx4[:, :1]), boxes_Rx4], axis=-1)
        bins = roi_align(map_HxWxC[None], rois, (resolution, resolution), spatial_scale=1.0 / stride,
                         sampling_ratio=0, aligned=True)
        return bins.max(axis=(1, 2))
    return jax.vmap(one)(map_BxHxWxC, boxes_BxRx4.astype(jnp.float32))


class Detector(nnx.Module):
    """An MViTv2 ``encoder`` with the RoI head (module docstring). ``image_size`` is the square
    input side the encoder was built for; ``dropout`` the rate before the Linear (training only)."""

    def __init__(self, encoder: nnx.Module, width: int, num_classes: int, *, image_size: int, rngs,
                 dropout: float = 0.0, head_init_scale: float = 0.001, resolution: int = RESOLUTION):
        self.encoder = encoder
        self.fc_norm = LayerNorm(width, rngs=rngs, dtype=encoder.dtype)
        self.head = Dense(width, num_classes, ("embed", "classes"), rngs=rngs, dtype=encoder.dtype)
        self.head.kernel[...] = self.head.kernel[...] * head_init_scale
        self.head.bias[...] = self.head.bias[...] * head_init_scale
        self.dropout_rate, self.resolution = float(dropout), int(resolution)
        self.stride = feature_stride(image_size, encoder.grid)

    def feature_map(self, images, *, rng=None):
        """The encoder's outputs plus ``map_BxHxWxC``: the normalised tokens (cls dropped) on the
        encoder's grid, averaged over time, float32."""
        out = self.encoder(images, rng=rng)
        t, h, w = self.encoder.grid
        x = self.fc_norm(out["tokens_BxNxD"])[:, 1:].astype(jnp.float32)
        x_BxTxHxWxC = x.reshape(x.shape[0], t, h, w, x.shape[-1])
        out["map_BxHxWxC"] = x_BxTxHxWxC.mean(axis=1)
        return out

    def __call__(self, images, boxes_BxRx4, *, rng=None):
        """``out["logits_BxRxK"]`` (float32): class logits of each of the ``R`` boxes per example
        (padding boxes too: weigh them out), plus ``pooled_BxRxC`` and the encoder's outputs."""
        out = self.feature_map(images, rng=rng)
        out["pooled_BxRxC"] = pool_boxes(out["map_BxHxWxC"], boxes_BxRx4, self.stride, self.resolution)
        x = head_dropout(out["pooled_BxRxC"], self.dropout_rate, rng).astype(self.encoder.dtype)
        out["logits_BxRxK"] = self.head(x).astype(jnp.float32)
        return out
