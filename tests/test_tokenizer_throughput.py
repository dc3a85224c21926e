"""benchmarks/tokenizer_throughput.py (issue 15, item 6): its measuring functions on a tiny random
tokenizer, one repeat: the figures' structure, positive finite rates, and the shapes it measured."""

import math

import numpy as np
from flax import nnx

from benchmarks.tokenizer_throughput import measure_tokenizer, pixel_ops, run_rounds
from kairos_jax.tokenizer import Tokenizer, TokenizerConfig, VideoAutoencoder

TINY = TokenizerConfig(base_dim=8, z_dim=4, num_res_blocks=1)      # the Wan2.1 layout, tiny


def test_measure_tokenizer_structure_and_rates():
    tok = Tokenizer(VideoAutoencoder(TINY, rngs=nnx.Rngs(0)))
    batch, frames, size = 2, 9, 16
    out = measure_tokenizer(tok, case="tiny", batch=batch, frames=frames, height=size, width=size, repeats=1)
    ops = out["ops"]
    assert set(ops) == {"encode", "decode", "stream_encode", "stream_decode"}
    n_lat = 1 + (frames - 1) // 4
    for name, r in ops.items():
        assert r["case"] == "tiny" and r["op"] == name and r["repeats"] == 1 and len(r["times_s"]) == 1
        assert r["frames"] == batch * frames and r["latent_frames"] == batch * n_lat
        for key in ("frames_per_s", "latent_frames_per_s", "median_s", "first_call_s", "ms_per_call"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["compile_s"] >= 0
        assert math.isclose(r["frames_per_s"] / r["latent_frames_per_s"], frames / n_lat)
    # whole clips are one call; streaming is frame 0 alone, then one latent frame (4 frames) per call
    assert ops["encode"]["calls_per_pass"] == ops["decode"]["calls_per_pass"] == 1
    assert ops["stream_encode"]["calls_per_pass"] == ops["stream_decode"]["calls_per_pass"] == n_lat

    info = out["info"]
    assert info["input_shape"] == [batch, frames, size, size, 3]
    assert info["latent_shape"] == [batch, n_lat, size // 8, size // 8, 4]
    assert info["decoded_shape"] == info["roundtrip_shape"] == info["input_shape"] and info["roundtrip_shape_ok"]
    assert info["stream_calls"] == {"encode_frames": [1, 4, 4], "decode_latent_frames": [1, 1, 1]}
    assert info["stream_encode_max_abs_diff"] < 1e-4 and info["stream_decode_max_abs_diff"] < 1e-4
    assert info["params"] > 0

    # independently of the script: decode(encode(x)) of a clip of the measured shape gives that shape back
    x = np.random.default_rng(1).uniform(-1, 1, info["input_shape"]).astype(np.float32)
    z = tok.encode(x)
    assert list(z.shape) == info["latent_shape"]
    assert tok.decode(z).shape == x.shape

    # chunks of 2 latent frames: frame 0, then 8 frames
    chunked = measure_tokenizer(tok, batch=1, frames=9, height=16, width=16, repeats=1, stream_chunk=2)
    assert chunked["info"]["stream_calls"] == {"encode_frames": [1, 8], "decode_latent_frames": [1, 2]}
    assert chunked["ops"]["stream_encode"]["calls_per_pass"] == 2


def test_pixel_reference_round_trips_exactly():
    ops, describe = pixel_ops("pixels", batch=2, frames=5, height=16, width=16, patch=8, repeats=1)
    run_rounds(ops)
    info = describe()
    assert info["latent_shape"] == [2, 5, 4, 8 * 8 * 3] and info["roundtrip_exact"] and info["roundtrip_shape_ok"]
    for o in ops:
        r = o.result()
        assert r["compile_s"] is None and math.isfinite(r["frames_per_s"]) and r["frames_per_s"] > 0
