"""Tests run on 8 fake CPU devices; absl flags are marked parsed for grain.

The ``python -m maskfeat_jax.main`` subprocesses that many tests start share one persistent
compilation cache per test session: the same programs compile once, the small ones too (a
first checkpoint save alone compiles a slice program per parameter shape). The test process
itself never uses it: the variables are taken out of its environment before jax is imported
and put back afterwards, for the subprocesses (and pytest-xdist workers) to inherit.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)

import jax  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set before jax import)"

_OWN_CACHE = _CACHE is None
if _OWN_CACHE:
    _CACHE = tempfile.mkdtemp(prefix="maskfeat_test_jax_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
