"""MaskFeat in JAX/Flax: masked HOG feature prediction for ViT and MViTv2."""
