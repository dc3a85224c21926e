"""The package as a user installs it: a wheel built from the checkout, installed outside it, run from
another directory. Catches a module, config or data file that setup.py does not ship (the tests
otherwise import the checkout itself).

The wheel goes into its own folder (`pip install --no-deps --target`), first on PYTHONPATH, so the
installed copy is imported instead of this checkout's editable install; its dependencies are the
test environment's. Each command checks where kairos_jax was imported from.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow   # builds and installs a wheel (~2 min): make test-extra


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("installed")
    wheels, site = base / "wheels", base / "site"
    try:   # build with this environment's setuptools when it has one (no download)
        import setuptools  # noqa: F401
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("kairos_jax-*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return site, elsewhere, env


def run(installed, *args, timeout=600):
    site, elsewhere, env = installed
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_installed_copy_is_imported_with_its_configs_and_gpu_targets(installed):
    site = str(installed[0])
    code = """
import json, importlib.resources as r
import kairos_jax, experiments, data_pipelines, pallas_kernels
from kairos_jax import cli
from experiments import embedded
print(json.dumps({
    **{m.__name__: m.__file__ for m in (kairos_jax, experiments, data_pipelines, pallas_kernels)},
    "config_file": cli.config_file("phase3_robot:embedded"),
    "width": embedded.get_config().model.video_width,
    "targets": sorted(p.name for p in r.files("kairos_jax.scaling").joinpath("gpu_targets").iterdir()),
}))
"""
    out = run(installed, "-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("kairos_jax", "experiments", "data_pipelines", "pallas_kernels", "config_file"):
        assert got[name].startswith(site), (name, got[name])
    assert got["config_file"].endswith("phase3_robot.py:embedded"), got
    assert got["width"] > 0 and any(t.endswith(".txtpb") for t in got["targets"]), got


@pytest.mark.parametrize("module", ["kairos_jax.train", "kairos_jax.rollout", "kairos_jax.compile",
                                    "kairos_jax.evaluate", "kairos_jax.serve", "data_pipelines.convert"])
def test_each_command_starts_from_another_directory(installed, module):
    out = run(installed, "-m", module, "--help")
    # absl prints its usage and exits 1 on --help, argparse exits 0; either way no traceback
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "Try --helpfull" in out.stdout or "usage:" in out.stdout, out.stdout[-2000:]


def test_training_by_config_name_runs_from_the_installed_package(installed, tiny_data_dir):
    workdir = installed[1] / "run"
    out = run(installed, "-m", "kairos_jax.train", "--config=phase3_robot:embedded", f"--workdir={workdir}",
              f"--config.data.root={tiny_data_dir}", "--config.phases.phase3_robot.steps=2",
              "--config.train.batch_size=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
              "--config.train.measure_peak_flops=False")
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert [(p["name"], p["steps"]) for p in summary] == [("phase3_robot", 2)], summary
    assert (workdir / "export" / "config.json").exists()
