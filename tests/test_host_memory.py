"""``host_memory``: XLA CPU's per-call temporaries stop being page-faulted anew once freed host
memory is kept; grain's workers keep theirs too; the 'auto' mode follows the platform; bad
settings are named."""
import os
import subprocess
import sys

import pytest

from maskfeat_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# keep_freed_memory first (before numpy and jax start threads), then page faults per call of a
# jitted function with over 64 MB of temporaries (above what one malloc arena's heap holds)
_FAULTS = r"""
import resource, sys
from maskfeat_jax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((3000, 3000), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x)))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    f(x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2)
"""


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, **env})


@pytest.mark.skipif(not host_memory.is_glibc(), reason="glibc's malloc only")
def test_kept_host_memory_ends_the_per_call_page_faults_of_xla_temporaries():
    def faults(mode):
        out = _run(_FAULTS, JAX_PLATFORMS="cpu", MASKFEAT_KEEP_HOST_MEMORY=mode)
        assert out.returncode == 0, out.stderr[-2000:]
        applied, per_call = out.stdout.split()
        return applied == "True", float(per_call)

    (applied_off, off), (applied_auto, auto) = faults("off"), faults("auto")
    assert not applied_off and applied_auto
    assert off > 10_000, off        # 72+ MB faulted in again on every call (4 KiB pages)
    assert auto < off / 20, (auto, off)


def test_auto_follows_the_platform():
    assert host_memory.cpu_backend_only({"JAX_PLATFORMS": "cpu"})
    assert not host_memory.cpu_backend_only({"JAX_PLATFORMS": "cuda"})
    assert not host_memory.cpu_backend_only({"JAX_PLATFORMS": "tpu,cpu"})
    # "auto" off the CPU changes nothing
    out = _run("from maskfeat_jax import host_memory; print(host_memory.keep_freed_memory())",
               JAX_PLATFORMS="cuda", MASKFEAT_KEEP_HOST_MEMORY="auto")
    assert out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.e2e
def test_a_bad_setting_is_named(tmp_path):
    with pytest.raises(ValueError, match="MASKFEAT_KEEP_HOST_MEMORY='yes'"):
        host_memory.keep_freed_memory("yes")
    out = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", "--config=configs/demo.py",
                          f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "MASKFEAT_KEEP_HOST_MEMORY": "yes"})
    assert out.returncode == 2 and "MASKFEAT_KEEP_HOST_MEMORY='yes'" in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(not host_memory.is_glibc(), reason="glibc's malloc only")
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_grain_workers_keep_freed_memory_unless_turned_off(mode, monkeypatch):
    """In a worker, a 40 MB buffer (above glibc's largest dynamic mmap threshold; a bytearray,
    which numpy's huge-page advice does not reach) allocated and freed again is faulted in once
    with the settings, on every allocation without them."""
    import grain
    import numpy as np
    from maskfeat_jax.data import pipeline

    def faults(_):
        import resource
        bytearray(40_000_000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):
            bytearray(40_000_000)
        return np.int64(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    monkeypatch.setenv(host_memory.ENV, mode)
    per_two = int(next(pipeline.read_batches(grain.MapDataset.range(1).map(faults), 1)))
    pages = 2 * 40_000_000 // 4096
    if mode == "off":
        assert per_two > pages // 2, per_two       # faulted in anew each time
    else:
        assert per_two < pages // 20, per_two
