"""Loading a serving export (kairos_jax/inference/export.py, ExportedRollout.load) and calling it with
what does not fit: a missing file, a file that is not an export, a manifest of another model, params
or state of the wrong shapes. Each is an ExportError (a CheckpointError: one line, exit 2, in commands)
naming the file or the argument; nothing reaches XLA with wrong shapes. The exported functions'
outputs against the engine are tested in tests/test_streaming.py (marker `slow`)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kairos_jax.inference.checkpoints import CheckpointError
from kairos_jax.inference.export import ExportedRollout, ExportError, param_leaves
from kairos_jax.inference.streaming import StreamingEngine
from kairos_jax.model import KairosWorldModel
from tests.conftest import synthetic_batch, tiny_config


def small_model(cfg, seed=0):
    abstract = nnx.eval_shape(lambda: KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, tree = jax.tree.flatten(state)
    r = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.unflatten(tree, [jnp.asarray(0.1 * r.standard_normal(x.shape), x.dtype)
                                                         for x in leaves]))


def export_to(directory, cfg, seed=0):
    model = small_model(cfg, seed)
    ExportedRollout.export(StreamingEngine(model, num_steps=1), modes=["simulate"], batch_size=2,
                           text_len=cfg.data.text_len).save(str(directory))
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny model exported, and another one (deeper and wider)."""
    root = tmp_path_factory.mktemp("exports")
    cfg, wide_cfg = tiny_config(depth=2), tiny_config(depth=4, video_width=48)
    model = export_to(root / "a", cfg)
    wide = export_to(root / "wide", wide_cfg)
    return dict(root=root, cfg=cfg, model=model, wide=wide, wide_cfg=wide_cfg)


@pytest.fixture
def folder(exports, tmp_path):
    shutil.copytree(exports["root"] / "a", tmp_path / "a")
    return tmp_path / "a"


def test_a_good_export_loads_and_starts(exports):
    served = ExportedRollout.load(str(exports["root"] / "a"))
    b = synthetic_batch(exports["cfg"], 2)
    state = served.start(param_leaves(exports["model"]), b["text"], b["embodiment_id"], b["action_dim_mask"])
    assert [list(x.shape) for x in state] == [s["shape"] for s in served.manifest["state"]]


def test_missing_files_are_named(folder):
    os.remove(folder / "step_forward_dynamics.jax_export")
    with pytest.raises(ExportError, match=r"step_forward_dynamics\.jax_export: missing \(the manifest .*manifest\.json "
                                          r"lists it"):
        ExportedRollout.load(str(folder))
    os.remove(folder / "manifest.json")
    with pytest.raises(ExportError, match=r"manifest\.json: not an exported rollout"):
        ExportedRollout.load(str(folder))
    with pytest.raises(ExportError, match="not an exported rollout"):
        ExportedRollout.load(str(folder / "nowhere"))


def test_a_file_that_is_not_an_export_is_named(folder):
    (folder / "start.jax_export").write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match=r"start\.jax_export: not a jax\.export serialisation"):
        ExportedRollout.load(str(folder))


def test_a_manifest_that_is_not_one_is_named(folder):
    (folder / "manifest.json").write_text(json.dumps({"params": []}))
    with pytest.raises(ExportError, match=r"not an exported rollout's manifest \(no state, batch_size, text_len, "
                                          r"modes\)"):
        ExportedRollout.load(str(folder))


def test_a_manifest_of_another_model_is_refused(exports, folder):
    shutil.copy(exports["root"] / "wide" / "manifest.json", folder / "manifest.json")
    with pytest.raises(ExportError, match=r"manifest\.json does not describe the exported functions beside it "
                                          r"\(.*\): a manifest of another model or export"):
        ExportedRollout.load(str(folder))
    # the other way round: the wide model's functions under the tiny model's manifest
    wide = folder.parent / "wide"
    shutil.copytree(exports["root"] / "wide", wide)
    shutil.copy(exports["root"] / "a" / "manifest.json", wide / "manifest.json")
    with pytest.raises(ExportError, match="a manifest of another model or export"):
        ExportedRollout.load(str(wide))


def test_params_and_inputs_of_the_wrong_shapes_are_named(exports):
    served = ExportedRollout.load(str(exports["root"] / "a"))
    b = synthetic_batch(exports["cfg"], 2)
    args = (b["text"], b["embodiment_id"], b["action_dim_mask"])
    params = param_leaves(exports["model"])
    # params of another (wider) model: the first parameter whose shape differs is named
    with pytest.raises(ExportError, match=r"parameter '[^']+' is float32\[\d+(, \d+)*\], the export takes "
                                          r"float32\[\d+(, \d+)*\]"):
        served.start(param_leaves(exports["wide"]), *args)
    with pytest.raises(ExportError, match=rf"got {len(params) - 1} parameter arrays, the export takes "
                                          rf"{len(params)}"):
        served.start(params[:-1], *args)
    # a batch of 3 for an export of batch 2
    b3 = synthetic_batch(exports["cfg"], 3)
    with pytest.raises(ExportError, match=r"text is int32\[3, \d+\], the export takes int32\[2, \d+\]"):
        served.start(params, b3["text"], b3["embodiment_id"], b3["action_dim_mask"])
    state = served.start(params, *args)
    video, actions = jnp.asarray(b["video"][:, 0]), jnp.asarray(b["actions"][:, 0])
    with pytest.raises(ExportError, match=r"got \d+ state arrays, the export's state has \d+"):
        served.step("simulate", params, state[:-1], jax.random.key(0), video, actions)
    with pytest.raises(ExportError, match=r"video is float32\[2, \d+, \d+\], the export takes float32\[2, \d+, \d+\]"):
        served.step("simulate", params, state, jax.random.key(0), video[:, :-1], actions)
    with pytest.raises(ExportError, match=r"mode 'policy' was not exported; exported: \[.forward_dynamics.\]"):
        served.step("policy", params, state, jax.random.key(0), video, actions)
    assert issubclass(ExportError, CheckpointError)
