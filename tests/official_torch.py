"""What the official-parity tests (``test_convert``, ``test_video_vit_parity``) share: the
official ViT's transformer block in PyTorch (PySlowFast's module names and layouts, written from
the spec), our model holding given parameters, and the check that an export loads into a
reference model with ``strict=True``.

Importing this module skips the importing test module where torch is not installed."""
import os

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from maskfeat_jax import export, saved as saved_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# The official ViT block (spec 0, 4.3, 6, 7.1, 7.2), with the official module names.

def ln(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = ln(dim), Attention(dim, heads), ln(dim), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------
# Our side: a model holding given parameters; exports loaded into the reference model.

def export_loads_strictly(workdir, fresh, expected, path):
    """``workdir`` exported to the ``.pyth`` ``path`` loads into the reference model ``fresh``
    with ``strict=True`` (every tensor present, none extra), each equal to ``expected``."""
    export.export(str(workdir), str(path))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model_state"]
    fresh.load_state_dict(ckpt["model_state"], strict=True)
    got = fresh.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def with_params(build, flat_params):
    """``build()``'s model (built abstractly) holding ``flat_params`` (our flattened paths),
    as a jitted function of its inputs."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(build)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    ours = saved_lib.flat_params(pure)
    assert set(flat_params) == set(ours)
    treedef = jax.tree_util.tree_structure(pure)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(flat_params[k]) for k in ours]))
    return jax.jit(lambda *args: nnx.merge(graphdef, state)(*args))
