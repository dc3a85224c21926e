"""Episode schema: validation cases and the pickle-free serialise / deserialise round trip."""

import dataclasses

import numpy as np
import pytest

from data_pipelines.episode import EpisodeError, deserialize, serialize
from tests.data.synthetic import make_episode


def test_valid_episode_round_trips_bit_exactly(rng):
    ep = make_episode(rng, T=7, episode_id="a/1", text="reach the red target — ünïcode")
    back = deserialize(serialize(ep))
    for name in ("frames", "actions", "proprio"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
        assert getattr(back, name).dtype == getattr(ep, name).dtype
    assert (back.text, back.embodiment, back.fps, back.source, back.episode_id) == \
        (ep.text, ep.embodiment, ep.fps, ep.source, ep.episode_id)
    assert back.latents is None


def test_action_free_and_latent_episodes_round_trip(rng):
    ep = make_episode(rng, actions=False, proprio=False, embodiment="passive_camera")
    back = deserialize(serialize(ep))
    assert back.actions is None and back.proprio is None
    latents = rng.normal(size=(ep.num_frames, 4, 4, 8)).astype(np.float32)
    lat = dataclasses.replace(ep, frames=None, latents=latents)
    back = deserialize(serialize(lat))
    assert back.frames is None
    np.testing.assert_array_equal(back.latents, lat.latents)


def test_serialised_episode_is_a_json_header_plus_aligned_raw_arrays(rng):
    """The container is read here by hand, independently of `deserialize`: magic, JSON header,
    each array's bytes at its 64-byte aligned offset; deserialised arrays are views (no copy)."""
    import json

    ep = make_episode(rng)
    data = serialize(ep)
    assert data[:8] == b"KAIROSEP"
    hlen = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16:16 + hlen])
    assert set(header["arrays"]) == {"frames", "actions", "proprio"}
    assert header["meta"]["embodiment"] == ep.embodiment
    for name, spec in header["arrays"].items():
        assert spec["offset"] % 64 == 0
        raw = np.frombuffer(data[spec["offset"]:spec["offset"] + spec["nbytes"]], np.dtype(spec["dtype"]))
        np.testing.assert_array_equal(raw.reshape(spec["shape"]), getattr(ep, name))
    back = deserialize(data)
    assert not back.frames.flags.owndata and not back.frames.flags.writeable


def test_damaged_headers_are_rejected(rng):
    import json

    data = serialize(make_episode(rng))
    hlen = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16:16 + hlen])
    for change, message in [(lambda h: h["arrays"]["frames"].update(dtype="|O"), "invalid array spec"),
                            (lambda h: h["arrays"]["frames"].update(nbytes=1), "invalid array spec"),
                            (lambda h: h["arrays"]["actions"].update(offset=10**9), "truncated"),
                            (lambda h: h.update(schema_version=1), "schema version 1")]:
        h = json.loads(json.dumps(header))
        change(h)
        enc = json.dumps(h).encode()
        bad = data[:8] + len(enc).to_bytes(8, "little") + enc + data[16 + len(enc):]
        with pytest.raises(EpisodeError, match=message):
            deserialize(bad)


@pytest.mark.parametrize("change, message", [
    (lambda e: dict(frames=e.frames.astype(np.float32)), "frames must be uint8"),
    (lambda e: dict(frames=e.frames[..., :2]), "1 or 3 channels"),
    (lambda e: dict(frames=None), "exactly one of frames and latents"),
    (lambda e: dict(actions=e.actions[:-1]), "actions has 11 steps but there are 12 frames"),
    (lambda e: dict(actions=e.actions.astype(np.float64)), "actions must be float32"),
    (lambda e: dict(proprio=np.where(np.arange(12)[:, None] == 5, np.nan, e.proprio).astype(np.float32)),
     "proprio contain NaN or inf (first at step 5)"),
    (lambda e: dict(actions=np.full_like(e.actions, np.inf)), "actions contain NaN or inf (first at step 0)"),
    (lambda e: dict(actions=np.zeros((12, 0), np.float32)), "zero dimensions"),
    (lambda e: dict(fps=0.0), "fps must be a positive number"),
    (lambda e: dict(embodiment=""), "embodiment name is empty"),
    (lambda e: dict(source=""), "source is empty"),
    (lambda e: dict(frames=e.frames[:0], actions=None, proprio=None), "has no frames"),
])
def test_validation_names_the_episode_and_the_field(rng, change, message):
    ep = make_episode(rng, episode_id="ep7", source="src")
    bad = dataclasses.replace(ep, **change(ep))
    with pytest.raises(EpisodeError) as e:
        bad.validate()
    assert message in str(e.value)
    assert "src/ep7" in str(e.value) or "episode /ep7" in str(e.value)


def test_damaged_record_raises_episode_error(rng):
    data = serialize(make_episode(rng))
    with pytest.raises(EpisodeError, match="truncated"):
        deserialize(data[: len(data) // 2])
    with pytest.raises(EpisodeError, match="not a serialised episode"):
        deserialize(b"")
    with pytest.raises(EpisodeError, match="not a serialised episode"):
        deserialize(b"PK\x03\x04" + data[4:])
