"""Parity with diffusers' PyTorch `AutoencoderKLWan` (Wan2.1 and Wan2.2 layouts), float32.

The reference runs in the separate .venv-diffusers (`make diffusers-venv`; torch never enters .venv):
tests/tokenizer/diffusers_reference.py builds a small random AutoencoderKLWan, save_pretrained's it and
writes diffusers' own encode/decode outputs to an .npz; here that folder goes through our converter and the
JAX model must reproduce them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kairos_jax.tokenizer import load
from kairos_jax.tokenizer.convert import config_from_diffusers, diffusers_key, to_ours
from kairos_jax.tokenizer.convert import main as convert_main
from kairos_jax.tokenizer.io import param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_PYTHON = os.path.join(ROOT, ".venv-diffusers", "bin", "python")
REFERENCE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_reference.py")
TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.diffusers,
    pytest.mark.skipif(not os.path.exists(REFERENCE_PYTHON),
                       reason=".venv-diffusers is absent: run `make diffusers-venv` to build the reference "
                              "environment (CPU torch + diffusers, Python 3.11)"),
]


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _reference_script(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run([REFERENCE_PYTHON, REFERENCE_SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode:
        pytest.fail(f"reference script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def run_reference(name: str, out: str) -> dict:
    _reference_script(f"--config={name}", f"--out={out}")
    ref = dict(np.load(os.path.join(out, "reference.npz")))
    with open(os.path.join(out, "diffusers", "config.json")) as f:
        ref["config"] = json.load(f)
    return ref


@pytest.mark.parametrize("name", ["wan21", "wan22"])
def test_matches_diffusers(name, tmp_path, capsys):
    ref = run_reference(name, str(tmp_path / "reference"))
    out = str(tmp_path / "tokenizer")
    assert convert_main([f"--input={tmp_path / 'reference' / 'diffusers'}", f"--output={out}"]) == 0
    tok = load(out)

    cfg = ref["config"]
    assert tok.spatial_compression == cfg["scale_factor_spatial"]
    assert tok.temporal_compression == cfg["scale_factor_temporal"] == 4
    assert tok.latent_channels == cfg["z_dim"]
    if len(cfg["latents_mean"]) == cfg["z_dim"]:
        np.testing.assert_allclose(tok.latents_mean, cfg["latents_mean"], rtol=1e-6)
        np.testing.assert_allclose(tok.latents_std, cfg["latents_std"], rtol=1e-6)

    video = ref["video"]
    mean, logvar = tok.encode_distribution(video)
    errors = {"encode_mean": rel_err(mean, ref["mean"]), "encode_logvar": rel_err(logvar, ref["logvar"])}
    # Decode diffusers' own latents, so the decoder is checked on its own.
    errors["decode"] = rel_err(tok.decode(ref["mean"], clip=False), ref["decoded_raw"])
    errors["decode_clipped"] = rel_err(tok.decode(ref["mean"]), ref["decoded"])

    # Step by step: frame 0, then groups of 4 frames / one latent frame at a time.
    ft = tok.temporal_compression
    chunks, state = [], None
    for start, stop in [(0, 1)] + [(1 + ft * i, 1 + ft * (i + 1)) for i in range((video.shape[1] - 1) // ft)]:
        z, state = tok.encode_step(video[:, start:stop], state)
        chunks.append(z)
    errors["encode_streaming"] = rel_err(np.concatenate(chunks, axis=1), ref["mean"])
    frames, state = [], None
    for t in range(ref["mean"].shape[1]):
        x, state = tok.decode_step(ref["mean"][:, t:t + 1], state, clip=False)
        frames.append(x)
    errors["decode_streaming"] = rel_err(np.concatenate(frames, axis=1), ref["decoded_raw"])

    with capsys.disabled():
        print(f"\n{name}: video {video.shape} -> latents {ref['mean'].shape}; max relative error "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), file=sys.stderr)
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"{name}: relative errors above {TOLERANCE}: {bad}"


@pytest.mark.parametrize("name, factors, params_m", [("wan21", (8, 4, 16), 126.89), ("wan22", (16, 4, 48), 704.69)])
def test_released_layouts_map_one_to_one(name, factors, params_m, tmp_path):
    """The full-size Wan2.1 / Wan2.2 architectures: every diffusers tensor has exactly one parameter of ours of
    the matching shape (checked on shapes only, nothing is allocated)."""
    _reference_script(f"--config={name}", f"--out={tmp_path}", "--shapes")
    with open(tmp_path / "shapes.json") as f:
        ref = json.load(f)
    cfg = config_from_diffusers(ref["config"])
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.z_dim) == factors
    ours = param_shapes(cfg)
    keys = {path: diffusers_key(path) for path in ours}
    assert sorted(keys.values()) == sorted(ref["shapes"])
    for path, key in keys.items():
        view = np.broadcast_to(np.float32(0), ref["shapes"][key])
        assert to_ours(key, view, ours[path]).shape == ours[path], (path, key)
    n = sum(int(np.prod(s)) for s in ours.values())
    assert abs(n / 1e6 - params_m) < 0.01, n
