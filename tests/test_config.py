"""Bad configs, missing data and unwritable workdirs fail at start with a message naming the field."""

import os
import subprocess
import sys

import pytest

from experiments import embedded, kairos_4b, phase1_video, phase2_human, phase3_robot
from kairos_jax.config import ConfigError, check_data_sources, check_workdir, validate
from tests.conftest import tiny_config


@pytest.mark.parametrize("module", [embedded, kairos_4b, phase1_video, phase2_human, phase3_robot])
def test_shipped_configs_are_valid(module):
    validate(module.get_config())


def test_phase_files_take_a_model_size():
    c = phase2_human.get_config("4b")
    assert (c.model.video_width, c.model.depth, c.model.num_heads, c.model.action_width) == (2560, 32, 20, 1024)
    assert tuple(c.model.pattern) == ("swa", "swa", "dswa", "gdn") and c.model.dilation == 4
    assert tuple(c.curriculum) == ("phase2_human",)
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        phase1_video.get_config("huge")


BAD = [
    ("model.pattern", lambda c: c.model.update(dict(pattern=("swa", "mamba"))), "model.pattern"),
    ("depth", lambda c: c.model.update(dict(depth=6)), "model.depth"),
    ("mixer_impl", lambda c: c.model.update(dict(mixer_impl="fast")), "one of ('auto', 'reference'"),
    ("dtype", lambda c: c.model.update(dict(dtype="float16")), "model.dtype"),
    ("remat", lambda c: c.model.update(dict(remat="some")), "model.remat"),
    ("head_dim", lambda c: c.model.update(dict(head_dim=7)), "model.head_dim"),
    ("patch", lambda c: c.data.update(dict(image_size=30)), "data.image_size"),
    ("channels", lambda c: c.data.update(dict(channels=0)), "data.channels"),
    ("width", lambda c: c.data.update(dict(image_width=30)), "data.image_width"),
    ("accum", lambda c: c.train.update(dict(batch_size=6, grad_accum=4)), "train.batch_size"),
    ("lr", lambda c: c.train.update(dict(lr=0.0)), "train.lr"),
    ("sigma", lambda c: c.train.update(dict(sigma_sampling="cosine")), "train.sigma_sampling"),
    ("mesh", lambda c: c.mesh.update(dict(data=-1, fsdp=-1)), "mesh"),
    ("profile", lambda c: c.train.update(dict(profile_steps=(5, 3))), "train.profile_steps"),
    ("profile0", lambda c: c.train.update(dict(profile_steps=(0, 3))), "train.profile_steps"),
    ("mesh0", lambda c: c.mesh.update(dict(tensor=0)), "mesh.tensor"),
    ("curriculum", lambda c: setattr(c, "curriculum", ("phase9",)), "curriculum"),
    ("weights", lambda c: c.phases.phase1_video.mixture.update(dict(passive_video=-1.0)), "mixture"),
    ("modes", lambda c: c.phases.phase1_video.modes.update(dict(joint=0.0, video_prediction=0.0)), "modes"),
    ("prediction", lambda c: c.model.update(dict(prediction="eps")), "model.prediction"),
    ("loss_target", lambda c: c.train.update(dict(loss_target="eps")), "train.loss_target"),
    ("loss_min_sigma", lambda c: c.train.update(dict(loss_min_sigma=0.0)), "train.loss_min_sigma"),
    # a velocity head narrower than a patch (4 x 4 x 3 = 48 values) cannot carry the noise it must predict
    ("narrow velocity", lambda c: c.model.update(dict(prediction="velocity", video_residual=False, video_width=32)),
     "must be >= the values of one patch"),
    ("residual velocity", lambda c: c.model.update(dict(prediction="velocity", video_residual=True)),
     "model.video_residual=True is invalid"),
]


def test_a_narrow_model_is_fine_with_the_x0_head():
    c = tiny_config(prediction="x0", video_width=32)        # 32 < 48 values per patch
    validate(c)


@pytest.mark.parametrize("name,mutate,field", BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_field(name, mutate, field):
    c = tiny_config()
    mutate(c)
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert field in str(e.value)


def test_missing_data_root_and_source(tmp_path):
    c = tiny_config()
    c.data.root = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.root.*does not exist"):
        check_data_sources(c)
    (tmp_path / "data" / "passive_video").mkdir(parents=True)
    c.data.root = str(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"names source 'human'.*sources under .*\['passive_video'\]"):
        check_data_sources(c)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created"):
        check_workdir(str(blocker / "run"))
    check_workdir(str(tmp_path / "fine"))
    assert os.path.isdir(tmp_path / "fine")


def test_entry_point_fails_fast_with_the_message(tmp_path):
    """`python -m kairos_jax.train` with a bad value exits with status 2 and a one-line reason,
    before building the model (no traceback)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "kairos_jax.train", "--config=experiments/embedded.py",
           f"--workdir={tmp_path / 'w'}", "--config.model.mixer_impl=fast"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "config.model.mixer_impl='fast' is invalid" in out.stderr and "Traceback" not in out.stderr
    cmd[-1] = f"--config.data.root={tmp_path / 'missing'}"
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_workdir_check_is_safe_from_many_processes_at_once(tmp_path):
    """Every process of a multi-process run checks the shared workdir at the same moment; with one
    shared probe file name, one process removed another's probe and reported 'not writable'."""
    import concurrent.futures

    workdir = str(tmp_path / "shared")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [check_workdir(workdir) for _ in range(200)], range(8)))
    assert os.listdir(workdir) == []                      # no probe left behind
