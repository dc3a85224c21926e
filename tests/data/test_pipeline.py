"""The Grain pipeline of a phase: batch contract (shapes, dtypes and values re-derived independently
from the raw episodes), masks, mixing, moving weights, determinism, exact resume, process sharding,
multiprocess prefetch, and build-time errors."""

import json
import logging
import os
import shutil

import grain
import numpy as np
import pytest

from data_pipelines.embodiments import DEFAULT_REGISTRY
from data_pipelines.pipeline import ConfigError, batch_spec, build_dataset
from data_pipelines.shards import open_source, write_episodes
from experiments import base
from tests.data.synthetic import make_episode

ALL = ("cheetah", "human", "passive_video", "pusher", "reacher")


def _cfg(root, **data):
    c = base.get_base_config()
    c.data.root = root
    for k, v in data.items():
        c.data[k] = v
    return c.data


def _phase(steps=100, end=None, **weights):
    return base.phase(steps=steps, mixture_start=base.mixture(**weights),
                      mixture_end=None if end is None else base.mixture(**end),
                      mode_mixture=base.modes(joint=1.0))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# --- independent oracles (float64, loops; nothing shared with the pipeline's code) ---------------

def _oracle_video(frames, image_size, patch):
    """uint8 [L, H, H, 3] with H a multiple of image_size -> float [L, N, Dp] by block means + loops."""
    L, H, W, C = frames.shape
    f = H // image_size
    img = frames.astype(np.float64).reshape(L, image_size, f, image_size, f, C).mean(axis=(2, 4))
    n = image_size // patch
    out = np.zeros((L, n * n, patch * patch * C))
    for r in range(n):
        for c in range(n):
            out[:, r * n + c] = img[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch, :].reshape(L, -1)
    return out / 127.5 - 1.0


def _oracle_norm(x, stats):
    p01, p99 = np.asarray(stats["p01"], np.float64), np.asarray(stats["p99"], np.float64)
    return np.clip((x - (p99 + p01) / 2) / np.maximum((p99 - p01) / 2, 1e-6), -3, 3)


class _Raw:
    """Every episode of every source of a data root, with oracle video tokens of every frame."""

    def __init__(self, root, image_size, patch):
        self.episodes, self.tokens, self.stats = {}, {}, {}
        for name in ALL:
            src = open_source(os.path.join(root, name))
            ds = src.data_source()
            self.episodes[name] = [ds[i] for i in range(len(ds))]
            self.tokens[name] = [_oracle_video(e.frames, image_size, patch) for e in self.episodes[name]]
            with open(os.path.join(root, name, "stats.json")) as f:
                self.stats[name] = json.load(f)["embodiments"]

    def locate(self, name, video, k):
        """All (episode index, start) whose oracle tokens match `video` [T, N, Dp]."""
        T = video.shape[0]
        hits = []
        for e, tok in enumerate(self.tokens[name]):
            for start in range(tok.shape[0] - (T - 1) * k):
                if np.allclose(tok[start + k * np.arange(T)], video, atol=1e-5):
                    hits.append((e, start))
        return hits


@pytest.fixture(scope="module")
def raw(tiny_data_dir):
    return _Raw(tiny_data_dir, 32, 8)


def _oracle_delta_stats(episodes, reference, k):
    """p01 / p99 of a[s + m] - q[s][ref] over every chunk start s and offset m < k, by loops."""
    rows = []
    for ep in episodes:
        for s in range(ep.num_frames):
            for m in range(min(k, ep.num_frames - s)):
                rows.append([ep.actions[s + m, i] - ep.proprio[s, r] for i, r in enumerate(reference)])
    p01, p99 = np.percentile(np.asarray(rows, np.float64), [1, 99], axis=0)
    return {"p01": p01, "p99": p99}


def _check_element(batch, b, raw, cfg, names, delta_stats=None):
    """Re-derives element b of `batch` from the raw episode it was cut from; returns the episode.
    delta_stats: {embodiment: oracle stats} of data.delta_actions (actions relative to the state at
    the chunk's start)."""
    T, k, A, P = cfg.num_blocks, cfg.action_chunk, cfg.action_dim, cfg.proprio_dim
    name = names[int(batch["source_id"][b])]
    hits = raw.locate(name, batch["video"][b], k)
    assert hits, f"element {b} of source {name}: no clip of any episode has these video tokens"
    errors = []
    for e, start in hits:
        ep = raw.episodes[name][e]
        f = start + k * np.arange(T)
        emb = DEFAULT_REGISTRY.get(ep.embodiment)
        st = raw.stats[name][ep.embodiment]
        want_actions = np.zeros((T, k, A))
        want_mask = np.zeros(T)
        if ep.actions is not None:
            for t in range(T):
                if f[t] >= k:       # a_{t-1}: the k actions applied between frame f_{t-1} and f_t
                    chunk = ep.actions[f[t] - k:f[t]]
                    if delta_stats and ep.embodiment in delta_stats:      # from the state at frame f_{t-1}
                        chunk = chunk - ep.proprio[f[t] - k][list(emb.action_reference)]
                        want_actions[t, :, :emb.action_dim] = _oracle_norm(chunk, delta_stats[ep.embodiment])
                    else:
                        want_actions[t, :, :emb.action_dim] = _oracle_norm(chunk, st["action"])
                    want_mask[t] = 1
        want_proprio = np.zeros((T, P))
        if ep.proprio is not None:
            want_proprio[:, :emb.proprio_dim] = _oracle_norm(ep.proprio[f], st["proprio"])
        text = np.zeros(cfg.text_len, np.int64)
        raw_bytes = list(ep.text.encode("utf-8"))[:cfg.text_len]
        text[:len(raw_bytes)] = np.array(raw_bytes) + 1
        checks = [
            np.allclose(batch["actions"][b], want_actions, atol=1e-5),
            np.array_equal(batch["action_mask"][b], want_mask),
            np.array_equal(batch["action_dim_mask"][b], np.arange(A) < emb.action_dim),
            np.allclose(batch["proprio"][b], want_proprio, atol=1e-5),
            np.array_equal(batch["proprio_mask"][b], np.full(T, float(ep.proprio is not None))),
            np.array_equal(batch["proprio_dim_mask"][b], np.arange(P) < emb.proprio_dim),
            int(batch["embodiment_id"][b]) == emb.id,
            np.array_equal(batch["text"][b], text),
            np.allclose(batch["progress"][b], f / (ep.num_frames - 1), atol=1e-7),
        ]
        if all(checks):
            return ep
        errors.append((e, start, checks))
    raise AssertionError(f"element {b} of source {name}: video matches {hits} but other fields do not: "
                         f"{errors}")


def test_batch_contract_shapes_dtypes_and_values(tiny_data_dir, raw):
    cfg = _cfg(tiny_data_dir)
    ds = build_dataset(cfg, _phase(**{n: 1.0 for n in ALL}), seed=3, batch_size=8)
    assert isinstance(ds, grain.IterDataset)
    batches = _take(iter(ds), 3)
    T, k, N, Dp = 8, 4, 16, 8 * 8 * 3
    want = {"video": ((8, T, N, Dp), np.float32), "actions": ((8, T, k, 32), np.float32),
            "action_mask": ((8, T), np.float32), "action_dim_mask": ((8, 32), np.float32),
            "proprio": ((8, T, 32), np.float32), "proprio_mask": ((8, T), np.float32),
            "proprio_dim_mask": ((8, 32), np.float32), "embodiment_id": ((8,), np.int32),
            "source_id": ((8,), np.int32), "text": ((8, 64), np.int32), "progress": ((8, T), np.float32)}
    contract = batch_spec(cfg, 8)        # the written contract says the same, key by key
    assert {k: (f.shape, np.dtype(f.dtype)) for k, f in contract.items()} == want
    seen = set()
    for batch in batches:
        assert set(batch) == set(want)
        for key, (shape, dtype) in want.items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        for b in range(8):
            ep = _check_element(batch, b, raw, cfg, sorted(ALL))
            seen.add(ep.source)
    assert seen == set(ALL)


def test_action_free_source_has_zero_actions_and_masks(tiny_data_dir, raw):
    cfg = _cfg(tiny_data_dir)
    batch = next(iter(build_dataset(cfg, _phase(passive_video=1.0), seed=0, batch_size=4)))
    for key in ("actions", "action_mask", "action_dim_mask", "proprio", "proprio_mask", "proprio_dim_mask"):
        assert not batch[key].any(), key
    assert np.all(batch["embodiment_id"] == DEFAULT_REGISTRY.get("passive_camera").id)
    assert np.all(batch["source_id"] == 0)
    for b in range(4):
        _check_element(batch, b, raw, cfg, ["passive_video"])


def test_block_zero_is_masked_exactly_when_the_clip_starts_before_one_chunk(tiny_data_dir, raw):
    cfg = _cfg(tiny_data_dir, num_blocks=4, action_chunk=4)
    batches = _take(iter(build_dataset(cfg, _phase(reacher=1.0), seed=5, batch_size=8)), 6)
    masks = np.concatenate([b["action_mask"] for b in batches])
    starts = np.concatenate([b["progress"][:, 0] for b in batches])
    assert np.all(masks[:, 1:] == 1)
    assert set(masks[:, 0]) == {0.0, 1.0}          # both cases occur
    for b in range(8):
        _check_element(batches[0], b, raw, cfg, ["reacher"])
    assert starts.min() == 0.0


def test_episode_start_prob_starts_that_share_of_clips_at_frame_zero(tiny_data_dir, raw):
    """data.episode_start_prob = p: about p of the clips (plus the uniform draw's own share) start at
    the episode's first frame, each still the episode's true clip; 0 leaves the stream as it was
    without the field; 1 starts every clip at frame 0; outside [0, 1] is a ConfigError."""
    def starts(p, n=8):
        cfg = _cfg(tiny_data_dir, num_blocks=4, action_chunk=4, **({} if p is None else {"episode_start_prob": p}))
        batches = _take(iter(build_dataset(cfg, _phase(reacher=1.0), seed=5, batch_size=8)), n)
        for b in range(8):
            _check_element(batches[-1], b, raw, cfg, ["reacher"])
        return batches, np.concatenate([b["progress"][:, 0] for b in batches])

    plain, at = starts(None)
    zero, _ = starts(0.0)
    assert _equal(plain, zero)
    _, half = starts(0.5)
    uniform_share = np.mean(at == 0.0)
    assert 0.35 < np.mean(half == 0.0) < 0.8 and np.mean(half == 0.0) > uniform_share + 0.2
    _, every = starts(1.0, n=2)
    assert np.all(every == 0.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="episode_start_prob"):
            build_dataset(_cfg(tiny_data_dir, episode_start_prob=bad), _phase(reacher=1.0), seed=0, batch_size=2)


def test_delta_actions_are_relative_to_the_state_where_each_chunk_starts(tiny_data_dir, raw, tmp_path):
    """data.delta_actions: the pusher's joint targets minus its joint angles at the chunk's first
    frame, normalised by the statistics of exactly that quantity (loops over every chunk start of
    every episode); the reacher's torques have no reference and stay absolute. The run's saved
    statistics carry the same delta statistics, for inference to normalise as training did."""
    from data_pipelines.normalization import load_stats, write_stats
    from data_pipelines.pipeline import training_stats

    cfg = _cfg(tiny_data_dir, num_blocks=4, action_chunk=4, delta_actions=True)
    ref = DEFAULT_REGISTRY.get("pusher").action_reference
    oracle = {"pusher": _oracle_delta_stats(raw.episodes["pusher"], ref, 4)}
    batch = next(iter(build_dataset(cfg, _phase(pusher=1.0, reacher=1.0), seed=2, batch_size=8)))
    sources = sorted(["pusher", "reacher"])
    assert {sources[i] for i in batch["source_id"]} == set(sources)
    for b in range(8):
        _check_element(batch, b, raw, cfg, sources, delta_stats=oracle)
    saved = training_stats(tiny_data_dir, "pusher", cfg)["pusher"]
    assert saved.action_delta_chunk == 4
    np.testing.assert_allclose(saved.action_delta.p99, oracle["pusher"]["p99"], rtol=1e-5, atol=1e-6)
    write_stats(str(tmp_path), {"pusher": saved})
    back = load_stats(str(tmp_path))["pusher"]
    assert back.action_delta_chunk == 4
    np.testing.assert_array_equal(back.action_delta.p01, saved.action_delta.p01)
    assert training_stats(tiny_data_dir, "reacher", cfg)["reacher"].action_delta is None


def test_same_seed_same_batches_and_another_seed_differs(tiny_data_dir):
    cfg, ph = _cfg(tiny_data_dir), _phase(human=0.5, reacher=0.5)
    a = _take(iter(build_dataset(cfg, ph, seed=1, batch_size=4)), 4)
    b = _take(iter(build_dataset(cfg, ph, seed=1, batch_size=4)), 4)
    c = _take(iter(build_dataset(cfg, ph, seed=2, batch_size=4)), 4)
    assert _equal(a, b)
    assert not _equal(a, c)


@pytest.mark.parametrize("end", [None, dict(human=0.1, reacher=0.2, cheetah=0.7)])
def test_restored_iterator_continues_bit_exactly(tiny_data_dir, end):
    cfg = _cfg(tiny_data_dir)
    ph = _phase(steps=6, end=end, human=0.6, reacher=0.3, cheetah=0.1)
    it = iter(build_dataset(cfg, ph, seed=7, batch_size=4))
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)                                     # Grain checkpoints states as JSON
    rest = _take(it, 6)                                   # crosses the end of the phase's weight ramp
    resumed = iter(build_dataset(cfg, ph, seed=7, batch_size=4))
    resumed.set_state(json.loads(json.dumps(state)))
    assert _equal(_take(resumed, 6), rest)


def test_grain_checkpoint_handler_round_trip(tiny_data_dir, tmp_path):
    cfg, ph = _cfg(tiny_data_dir), _phase(pusher=1.0, human=1.0)
    it = iter(build_dataset(cfg, ph, seed=0, batch_size=2))
    _take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "iter").mkdir()
    handler.save(tmp_path / "iter", args=grain.checkpoint.CheckpointSave(it))
    want = _take(it, 3)
    it2 = iter(build_dataset(cfg, ph, seed=0, batch_size=2))
    handler.restore(tmp_path / "iter", args=grain.checkpoint.CheckpointRestore(it2))
    assert _equal(_take(it2, 3), want)


def test_mixing_follows_the_weights(tiny_data_dir):
    cfg = _cfg(tiny_data_dir, num_blocks=2, action_chunk=2, image_size=16)
    weights = dict(human=0.2, reacher=0.5, pusher=0.3)
    batches = _take(iter(build_dataset(cfg, _phase(**weights), seed=0, batch_size=10)), 10)
    ids = np.concatenate([b["source_id"] for b in batches])
    names = sorted(weights)
    share = {n: np.mean(ids == i) for i, n in enumerate(names)}
    for n, w in weights.items():
        assert abs(share[n] - w) < 0.02, share          # within two elements of 100


def test_moving_weights_move(tiny_data_dir):
    cfg = _cfg(tiny_data_dir, num_blocks=2, action_chunk=2, image_size=16)
    ph = _phase(steps=16, end=dict(human=0.0, cheetah=1.0), human=1.0, cheetah=0.0)
    batches = _take(iter(build_dataset(cfg, ph, seed=0, batch_size=16)), 20)
    ids = np.stack([b["source_id"] for b in batches])       # [step, B]; cheetah = 0, human = 1
    cheetah = (ids == 0).mean(axis=1)
    # 4 segments of 4 steps, weights taken at their middles: 1/8, 3/8, 5/8, 7/8; then the end weights
    np.testing.assert_allclose(cheetah[:16].reshape(4, 4).mean(axis=1), [0.125, 0.375, 0.625, 0.875],
                               atol=1 / 64)
    assert np.all(cheetah[16:] == 1.0)


def test_processes_read_disjoint_episodes(tiny_data_dir, raw):
    cfg = _cfg(tiny_data_dir)
    seen = []
    for p in range(2):
        it = iter(build_dataset(cfg, _phase(reacher=1.0, cheetah=1.0), seed=0, batch_size=4,
                                process_index=p, process_count=2))
        episodes = set()
        for batch in _take(it, 6):
            for b in range(4):
                name = ("cheetah", "reacher")[int(batch["source_id"][b])]
                episodes.update((name, e) for e, _ in raw.locate(name, batch["video"][b], 4))
        seen.append(episodes)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {e for _, e in seen[0] | seen[1]} == set(range(4))


def test_short_episodes_are_skipped_with_one_log_line(tmp_path, rng, caplog):
    eps = [make_episode(rng, T=T, episode_id=f"e{T}", hw=(16, 16)) for T in (5, 12, 40)]
    write_episodes(str(tmp_path / "reacher"), "reacher", eps)
    cfg = _cfg(str(tmp_path), num_blocks=4, action_chunk=3, image_size=16)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        batch = next(iter(build_dataset(cfg, _phase(reacher=1.0), seed=0, batch_size=4)))
    lines = [r.getMessage() for r in caplog.records if "shorter than" in r.getMessage()]
    assert len(lines) == 1 and "skipping 1 of 3 episodes" in lines[0] and "e5" in lines[0]
    assert batch["video"].shape == (4, 4, 4, 192)
    cfg.num_blocks = 20
    with pytest.raises(ConfigError, match="source 'reacher': 0 episodes of at least 60 frames"):
        build_dataset(cfg, _phase(reacher=1.0), seed=0, batch_size=4)


def test_multiprocess_prefetch_gives_the_same_batches(tiny_data_dir):
    ph = _phase(steps=10, end=dict(human=1.0, pusher=0.0), human=0.0, pusher=1.0)
    a = _take(iter(build_dataset(_cfg(tiny_data_dir), ph, seed=4, batch_size=4)), 4)
    it = iter(build_dataset(_cfg(tiny_data_dir, worker_count=2), ph, seed=4, batch_size=4))
    try:
        assert _equal(_take(it, 4), a)
    finally:
        it.close()


@pytest.mark.parametrize("setup, phase, message", [
    (lambda r: shutil.rmtree(r), dict(reacher=1.0), "is not a folder"),
    (lambda r: None, dict(octopus=1.0),
     r"source 'octopus': no folder .*octopus under data root .*holds \['reacher'\]"),
    (lambda r: None, dict(reacher=-1.0), "mixture.reacher: weight -1.0 must be finite and >= 0"),
    (lambda r: None, dict(reacher=0.0), "mixture weights are all zero"),
    (lambda r: None, dict(reacher=1.0, end=dict(human=1.0)), "mixture_end names"),
    (lambda r: None, dict(reacher=1.0, end=dict(reacher=0.0)), "mixture_end weights are all zero"),
    (lambda r: os.remove(os.path.join(r, "reacher", "manifest.json")), dict(reacher=1.0),
     "source 'reacher': .*manifest.json: missing"),
])
def test_build_time_errors_are_clear(tmp_path, rng, setup, phase, message):
    root = str(tmp_path / "root")
    write_episodes(os.path.join(root, "reacher"), "reacher", [make_episode(rng, T=40, hw=(16, 16))])
    setup(root)
    end = phase.pop("end", None)
    with pytest.raises(ConfigError, match=message):
        build_dataset(_cfg(root, image_size=16), _phase(end=end, **phase), seed=0, batch_size=2)


def test_source_without_shards_and_oversized_embodiment_are_errors(tmp_path, rng):
    root = tmp_path / "root"
    write_episodes(str(root / "reacher"), "reacher", [make_episode(rng, action_dim=5)])   # all skipped
    with pytest.raises(ConfigError, match="source 'reacher': .*no shards"):
        build_dataset(_cfg(str(root)), _phase(reacher=1.0), seed=0, batch_size=2)
    write_episodes(str(root / "cheetah"), "cheetah",
                   [make_episode(rng, T=40, embodiment="cheetah", action_dim=6, proprio_dim=17)])
    with pytest.raises(ConfigError, match="embodiment cheetah has 6 action dims but data.action_dim=4"):
        build_dataset(_cfg(str(root), action_dim=4), _phase(cheetah=1.0), seed=0, batch_size=2)
    # cheetah's id is 3: a 3-row embodiment table would index past its end (a NaN adapter)
    with pytest.raises(ConfigError, match="embodiment cheetah has id 3 but .*num_embodiments=3 rows"):
        build_dataset(_cfg(str(root), num_embodiments=3), _phase(cheetah=1.0), seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="data.image_size=30 is invalid: must be a multiple of data.patch_size=8"):
        build_dataset(_cfg(str(root), image_size=30), _phase(cheetah=1.0), seed=0, batch_size=2)


def test_latent_episodes_are_patchified_as_stored(tmp_path, rng):
    from data_pipelines.episode import Episode

    z = rng.normal(size=(20, 8, 8, 4)).astype(np.float32)
    ep = Episode(frames=None, latents=z, actions=None, proprio=None, text="latent clip",
                 embodiment="passive_camera", fps=10.0, source="lat", episode_id="z0")
    write_episodes(str(tmp_path / "lat"), "lat", [ep])
    cfg = _cfg(str(tmp_path), image_size=8, patch_size=4, channels=4, num_blocks=3, action_chunk=2)
    batch = next(iter(build_dataset(cfg, _phase(lat=1.0), seed=0, batch_size=2)))
    assert batch["video"].shape == (2, 3, 4, 64)
    for b in range(2):
        start = int(round(batch["progress"][b, 0] * 19))
        for t in range(3):
            frame = z[start + 2 * t]
            for r in range(2):
                for c in range(2):
                    want = frame[4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1)
                    np.testing.assert_array_equal(batch["video"][b, t, 2 * r + c], want)
    bad = _cfg(str(tmp_path), image_size=16, patch_size=4, channels=4)
    with pytest.raises(ConfigError, match="latents are 8x8x4; set data.image_size=8"):
        build_dataset(bad, _phase(lat=1.0), seed=0, batch_size=2)


def test_non_square_frames_are_centre_cropped_then_area_resized(rng):
    from data_pipelines.pipeline import resize_frames

    frames = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    got = resize_frames(frames, 32)
    # oracle: crop the central 48x48, upsample 2x by repetition (96x96), then 3x3 block means
    crop = frames[:, :, 8:56].astype(np.float64).repeat(2, axis=1).repeat(2, axis=2)
    want = crop.reshape(2, 32, 3, 32, 3, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert got.dtype == np.float32 and got.shape == (2, 32, 32, 3)


def test_rectangular_output_crops_to_its_aspect_then_area_resizes(rng):
    from data_pipelines.pipeline import resize_frames

    frames = rng.integers(0, 256, (2, 60, 64, 3), dtype=np.uint8)
    got = resize_frames(frames, 16, 32)          # 1:2 output: crop the central 32 rows x 64 columns
    want = frames[:, 14:46].astype(np.float64).reshape(2, 16, 2, 32, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert got.shape == (2, 16, 32, 3)
    tall = resize_frames(frames[:, :, :30], 20, 10)   # 60x30 is already 2:1: no crop, 3x3 block means
    np.testing.assert_allclose(tall, frames[:, :, :30].astype(np.float64).reshape(2, 20, 3, 10, 3, 3)
                               .mean(axis=(2, 4)), atol=1e-3)


def test_rectangular_latents_need_image_width_and_are_patchified_row_major(tmp_path, rng):
    from data_pipelines.episode import Episode

    z = rng.normal(size=(12, 4, 8, 2)).astype(np.float32)          # 4 x 8 latents (the paper's 30 x 52 kind)
    ep = Episode(frames=None, latents=z, actions=None, proprio=None, text="wide latent clip",
                 embodiment="passive_camera", fps=10.0, source="lat", episode_id="w0")
    write_episodes(str(tmp_path / "lat"), "lat", [ep])
    square = _cfg(str(tmp_path), image_size=4, patch_size=2, channels=2, num_blocks=2, action_chunk=2)
    with pytest.raises(ConfigError, match="latents are 4x8x2; set data.image_size=4, data.image_width=8"):
        build_dataset(square, _phase(lat=1.0), seed=0, batch_size=1)
    cfg = _cfg(str(tmp_path), image_size=4, image_width=8, patch_size=2, channels=2, num_blocks=2, action_chunk=2)
    batch = next(iter(build_dataset(cfg, _phase(lat=1.0), seed=0, batch_size=1)))
    assert batch["video"].shape == (1, 2, 8, 8)                   # (4/2) x (8/2) patches of 2 x 2 x 2
    start = int(round(batch["progress"][0, 0] * 11))
    frame = z[start]
    np.testing.assert_array_equal(batch["video"][0, 0, 5], frame[2:4, 2:4].reshape(-1))   # row 1, column 1
