"""The accelerator check (``benchmarks/accelerator_check.sh``) and the XLA flags of the launch
scripts (``launch/xla_flags.sh``), on the CPU."""
import importlib.util
import mmap
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/gpu_local.sh", "launch/slurm.sbatch", "launch/tpu_pod.sh", "launch/xla_flags.sh",
           "benchmarks/accelerator_check.sh"]


def _load_check():
    """benchmarks/accelerator_check.py as a module (benchmarks/ is not a package)."""
    if "accelerator_check" not in sys.modules:
        path = os.path.join(ROOT, "benchmarks", "accelerator_check.py")
        spec = importlib.util.spec_from_file_location("accelerator_check", path)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["accelerator_check"]


def _flag_set(name: str) -> list[str]:
    """The bash array ``name`` of launch/xla_flags.sh, one flag per item."""
    out = subprocess.run(["bash", "-c", f'source launch/xla_flags.sh && printf "%s\\n" "${{{name}[@]}}"'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def _names_in_binary(path: str, names: list[str]) -> set[str]:
    """Those of ``names`` that occur in the file as a whole word (not inside a longer name)."""
    word = re.compile(rb"[A-Za-z0-9_]")
    found = set()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for name in names:
            i = m.find(name.encode())
            while i != -1:
                before, after = m[i - 1:i], m[i + len(name):i + len(name) + 1]
                if not word.match(before) and not word.match(after):
                    found.add(name)
                    break
                i = m.find(name.encode(), i + 1)
    return found


def _flag_names(flags: list[str]) -> list[str]:
    return [f.lstrip("-").split("=")[0] for f in flags]


def _library_with(directory: str, anchor: str) -> str:
    """The shared library under ``directory`` that holds XLA's flag table (it names ``anchor``)."""
    for dirpath, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(dirpath, f)
            if ".so" in f and os.path.getsize(path) > 10_000_000 and _names_in_binary(path, [anchor]):
                return path
    pytest.fail(f"no shared library under {directory} names {anchor}")


def test_gpu_flags_are_known_to_the_installed_jaxlib():
    import jaxlib
    flags = _flag_set("GPU_XLA_FLAGS")
    assert len(flags) == 12 and all(f.startswith("--xla_") and "=" in f for f in flags)
    names = _flag_names(flags)
    lib = _library_with(os.path.dirname(jaxlib.__file__), "xla_gpu_enable_latency_hiding_scheduler")
    assert _names_in_binary(lib, names + ["xla_gpu_no_such_flag"]) == set(names)
    # XLA parses XLA_FLAGS on every backend and aborts on a name it does not know: the CPU starts
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    run = [sys.executable, "-c", "import jax; print(int(jax.numpy.ones(3).sum()))"]
    assert subprocess.run(run, env=env, capture_output=True, text=True, timeout=120).stdout.strip() == "3"
    env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"
    bad = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def test_tpu_flags_are_known_to_libtpu():
    spec = importlib.util.find_spec("libtpu")
    if spec is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]')")
    names = _flag_names(_flag_set("TPU_LIBTPU_FLAGS"))
    lib = _library_with(os.path.dirname(spec.origin), "xla_tpu_enable_async_collective_fusion")
    assert _names_in_binary(lib, names) == set(names)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


@pytest.mark.e2e
def test_launch_scripts_put_the_flags_before_the_users_own(tmp_path):
    """The GPU scripts export the GPU set then the caller's XLA_FLAGS; tpu_pod.sh sends the TPU set
    then the caller's LIBTPU_INIT_ARGS to the workers. python, srun and gcloud are stubs that
    record what they were given."""
    for stub in ("python", "srun", "gcloud"):
        path = tmp_path / stub
        path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$XLA_FLAGS" > {tmp_path}/{stub}.env\n'
                        f'for a in "$@"; do printf "%s\\n" "$a"; done > {tmp_path}/{stub}.args\n')
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", WORKDIR=str(tmp_path / "w"),
               DATA_DIR=str(tmp_path / "d"), REPO=ROOT, XLA_FLAGS="--xla_dump_to=/tmp/mine", TPU="t", ZONE="z",
               INSTALL="0", LIBTPU_INIT_ARGS="--xla_mine=1")
    gpu = " ".join(_flag_set("GPU_XLA_FLAGS"))
    for script, stub in (("launch/gpu_local.sh", "python"), ("launch/slurm.sbatch", "srun")):
        subprocess.run(["bash", script, "--config.seed=1"], cwd=ROOT, env=env, check=True, timeout=60)
        assert (tmp_path / f"{stub}.env").read_text().strip() == gpu + " --xla_dump_to=/tmp/mine"
        assert (tmp_path / f"{stub}.args").read_text().split()[-1] == "--config.seed=1"
    subprocess.run(["bash", "launch/tpu_pod.sh", "--config.seed=1"], cwd=ROOT, env=env, check=True, timeout=60)
    command = (tmp_path / "gcloud.args").read_text().split("--command=", 1)[1]
    words = shlex.split(command)       # as the workers' shell splits it
    assert "LIBTPU_INIT_ARGS=" + " ".join(_flag_set("TPU_LIBTPU_FLAGS")) + " --xla_mine=1" in words
    assert "--config.seed=1" in words


def test_stand_in_config_has_the_base_configs_values():
    from maskfeat_jax import config as config_lib
    check = _load_check()
    base, stand_in = config_lib.base_config(), check.stand_in_config()

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    got = dict(leaves(stand_in))
    assert len(got) > 30
    assert got == {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                   for k, v in ((k, config_lib._get(base, k)) for k in got)}


def test_step_is_the_trainers(tmp_path):
    """``build`` (without the trainer's imports) gives the step of ``train.setup`` + ``jit_step``."""
    from maskfeat_jax import sharding, train
    check = _load_check()
    config = check.make_config("mu/16", 2, "float32", 112)
    devices = jax.devices()[:1]
    mine = check.build(config, devices)
    local = check.synthetic_batch(config, mine.model.encoder.grid)
    batch = sharding.global_batch(mine.mesh, local)
    with jax.set_mesh(mine.mesh):
        _, ours = mine.step(mine.init(), batch)
    mesh = sharding.make_mesh(config.mesh, devices)
    st = train.setup(config, mesh, steps_per_epoch=1000, total_steps=100_000)
    batch = sharding.global_batch(mesh, local)
    with jax.set_mesh(mesh):
        _, theirs = train.jit_step(st, mesh, batch)(st.init(), batch)
    ours, theirs = jax.device_get((ours, theirs))
    assert set(ours) == set(theirs)
    for k in ("train/loss", "opt/grad_norm", "opt/lr"):
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, err_msg=k)


@pytest.mark.e2e
def test_smoke_run_without_grain_ml_collections_or_tfds(tmp_path):
    """The whole check, CPU-sized, in a Python where grain, ml_collections and tensorflow_datasets
    cannot be imported: every table is there, complete, and the CPU is compared with itself."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfor m in ('grain', 'ml_collections', 'tensorflow_datasets'):\n    sys.modules[m] = None\n")
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path / "out"), PYTHONPATH=str(site))
    p = subprocess.run(["bash", "benchmarks/accelerator_check.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    results = (tmp_path / "out" / "results.txt").read_text()
    for section in ("== versions and device ==", "== matmul ceiling", "== attention, bfloat16",
                    "== pre-training step: mu/16", "== correctness: mu/16 float32 step", "accelerator check done"):
        assert section in results, section
    assert "stand_in_config()" in results and "grain, ml_collections, tensorflow_datasets" in results
    assert "failed" not in results and "stopped by" not in results, results
    words = [line.split() for line in results.splitlines() if line.split()]
    rows = {tuple(w[:2]): w for w in words}          # e.g. ('xla', '197'), ('float32', '2')
    for impl in ("einsum", "xla"):
        for n in ("197", "198", "256"):
            assert float(rows[impl, n][3]) > 0 and float(rows[impl, n][4]) > 0, rows[impl, n]
    assert all("available:" in rows["cudnn", n] for n in ("197", "198", "256"))
    assert rows["bfloat16", "2"][2] == rows["float32", "2"][2] == "einsum"
    assert [w[-1] for w in words if w[0] in ("loss", "grad_norm")] == ["ok", "ok"]


@pytest.mark.e2e
def test_a_failing_part_is_reported_and_fails_the_run(tmp_path):
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\necho 'part output'\necho 'RuntimeError: boom' >&2\nexit 3\n")
    stub.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(stub))
    p = subprocess.run(["bash", "benchmarks/accelerator_check.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    results = (tmp_path / "out" / "results.txt").read_text()
    assert "(versions: failed with exit code 3: RuntimeError: boom)" in results
    assert "(steps --variant L/16: failed with exit code 3: RuntimeError: boom)" in results
