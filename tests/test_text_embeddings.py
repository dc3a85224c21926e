"""Precomputed text embeddings end to end (data_pipelines/text_embeddings.py), against a tiny
deterministic text encoder defined here (`hash_encoder`: one row per word, from the word's bytes) and
an independent reference that builds the same rows word by word (`reference`): the converter stores
one row per distinct text, calling the encoder once per batch of distinct texts, resumes, refuses a
different encoder; `text_embed` adds a table to a finished folder; the pipeline's batches carry the
reference rows (truncated or zero-padded to data.text_len); config mistakes are ConfigErrors saying
what to set or run; a tiny model trains two steps; rollout, evaluation and serving run the model with
the reference embedding, and say clearly what they cannot look up."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.convert import convert
from data_pipelines.convert import main as convert_main
from data_pipelines.pipeline import ConfigError, batch_spec, build_dataset, check_batch, episode_clip
from data_pipelines.shards import ShardedSource, ShardError, write_episodes
from data_pipelines.text_embed import main as text_embed_main
from data_pipelines.text_embed import text_embed
from data_pipelines.text_embeddings import MissingTextEmbedding
from kairos_jax.config import validate
from tests.conftest import tiny_config
from tests.data.synthetic import make_episode

# The encoders' spec names this module: let it resolve to this very module (CALLS, FAIL_ON), under
# whichever name pytest imported it.
sys.modules.setdefault("tests.test_text_embeddings", sys.modules[__name__])

L_EXT, D = 3, 5                   # the encoder's rows per text (words beyond are dropped) and features
TEXTS = ("a reach the red target", "b touch it", "c go")
ENCODER = "tests.test_text_embeddings:hash_encoder"
CALLS: list[list[str]] = []       # every call of the encoders below, with its texts
FAIL_ON: list[str] = []           # hash_encoder raises on a batch holding one of these texts


def _word(word: str) -> np.ndarray:
    """float64 [D]: one word's row, from its bytes."""
    b = np.frombuffer(word.encode(), np.uint8).astype(np.float64)
    return np.cos(np.outer(np.arange(1, D + 1), (np.arange(b.size) + 1) * b).sum(1) / 97.0)


def hash_encoder(texts):
    """list of N texts -> (float32 [N, L_EXT, D], mask [N, L_EXT]): a row per word (the first L_EXT)."""
    CALLS.append(list(texts))
    if any(t in FAIL_ON for t in texts):
        raise RuntimeError("encoder stopped")
    emb = np.zeros((len(texts), L_EXT, D), np.float32)
    mask = np.zeros((len(texts), L_EXT), np.int64)
    for i, t in enumerate(texts):
        for j, w in enumerate(t.split()[:L_EXT]):
            emb[i, j], mask[i, j] = _word(w), 1
    return emb, mask


def other_encoder(texts):
    """Same D, other values: another model."""
    emb, mask = hash_encoder(texts)
    return 2.0 * emb, mask


def vector_encoder(texts):
    """One vector per text: float [N, D]."""
    CALLS.append(list(texts))
    return np.stack([np.mean([_word(w) for w in t.split()], 0) for t in texts])


def reference(text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows a clip must carry for `text` (independent of the stored table): float32 [length, D]."""
    words = text.split()[:min(L_EXT, length)]
    emb, mask = np.zeros((length, D), np.float32), np.zeros(length, np.float32)
    for j, w in enumerate(words):
        emb[j], mask[j] = _word(w), 1.0
    return emb, mask


def _episodes(texts, seed=0):
    r = np.random.default_rng(seed)
    return [make_episode(r, T=12, hw=(16, 16), episode_id=f"ep{i}", text=t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data/reacher converted with --text_encoder (5 episodes, 3 distinct texts, batches of 2), a raw
    shard folder without text embeddings, and the converter's summary and encoder calls."""
    root = tmp_path_factory.mktemp("text")
    write_episodes(str(root / "raw" / "reacher"), "reacher", _episodes([TEXTS[i % 3] for i in range(5)]))
    CALLS.clear()
    summary = convert("shards", str(root / "raw" / "reacher"), str(root / "data" / "reacher"), text_encoder=ENCODER,
                      text_batch=2)
    return dict(root=root, summary=summary, calls=list(CALLS))


def text_config(root, text_len=4, **model):
    cfg = tiny_config(pattern=("swa",), depth=1, scan_layers=False, text_encoder="precomputed",
                      text_embedding_dim=D, **model)
    cfg.data.update(dict(root=str(root), image_size=8, num_blocks=3, action_chunk=2, text_len=text_len,
                         text_embedding_dim=D))
    cfg.curriculum = ("phase3_robot",)
    cfg.phases.phase3_robot.mixture = {"reacher": 1.0}
    cfg.phases.phase3_robot.mixture_end = {}
    cfg.phases.phase3_robot.steps = 2
    cfg.train.update(dict(batch_size=2, checkpoint_every=2))
    return cfg


# -- storing ------------------------------------------------------------------------------------------

def test_converter_stores_one_row_per_distinct_text_as_the_encoder_computes_it(data):
    assert data["calls"] == [sorted(TEXTS)[:2], sorted(TEXTS)[2:]]     # once per batch of distinct texts
    src = ShardedSource(str(data["root"] / "data" / "reacher"))
    record = {"encoder": ENCODER, "dim": D, "length": L_EXT, "count": 3, "index": "text_embeddings.json"}
    assert src.manifest["text_embeddings"] == record and data["summary"]["text_embeddings"] == record
    table = src.text_embeddings()
    assert table.texts == sorted(TEXTS) and table.encoder == ENCODER
    for text in TEXTS:
        emb, mask = table.lookup(text)
        want, want_mask = reference(text, L_EXT)
        np.testing.assert_allclose(emb, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mask, want_mask)
    arrays = np.load(src.directory + "/text_embeddings.npy", allow_pickle=False)
    assert arrays.dtype == np.float32 and arrays.shape == (3, L_EXT, D)
    assert not [n for n in os.listdir(src.directory + "/.convert") if n.startswith("text-")]   # batches removed
    with pytest.raises(MissingTextEmbedding, match="'z unknown' has no stored embedding"):
        table.lookup("z unknown")


def test_a_rerun_resumes_keeps_and_refuses_text_encoders(data, tmp_path, capsys):
    raw, out = str(data["root"] / "raw" / "reacher"), str(tmp_path / "out")
    FAIL_ON[:] = [sorted(TEXTS)[2]]                      # the second batch fails: the first is kept
    with pytest.raises(RuntimeError, match="encoder stopped"):
        convert("shards", raw, out, text_encoder=ENCODER, text_batch=2)
    FAIL_ON.clear()
    CALLS.clear()
    convert("shards", raw, out, text_encoder=ENCODER, text_batch=2)
    assert list(CALLS) == [sorted(TEXTS)[2:]]            # resumed: only the batch that had not finished
    CALLS.clear()
    convert("shards", raw, out, text_encoder=ENCODER, text_batch=2)
    convert("shards", raw, out)                          # no flag: the recorded encoder is kept
    assert CALLS == [] and ShardedSource(out).text_info.encoder == ENCODER
    other = "tests.test_text_embeddings:other_encoder"
    with pytest.raises(SystemExit) as e:
        convert_main(["--format=shards", f"--input={raw}", f"--output={out}", f"--text_encoder={other}",
                      "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"--text_encoder={ENCODER}" in err[0]
    assert f"text_embed --input={out} --text_encoder={other} --overwrite" in err[0]
    with pytest.raises(ShardError, match="pass --overwrite"):
        text_embed(out, other)
    text_embed(out, other, overwrite=True)              # replaced without converting the video again
    table = ShardedSource(out).text_embeddings()
    np.testing.assert_allclose(table.lookup(TEXTS[0])[0], 2 * reference(TEXTS[0], L_EXT)[0], rtol=1e-6)
    with open(os.path.join(out, ".convert", "plan.json")) as f:
        assert json.load(f)["text_encoder"] == other
    CALLS.clear()
    convert("shards", raw, out, text_encoder=other)      # the conversion now resumes with that encoder
    assert CALLS == [] and ShardedSource(out).text_info.encoder == other


def test_text_embed_adds_a_table_to_a_finished_folder(data, tmp_path, capsys):
    folder = tmp_path / "reacher"
    shutil.copytree(data["root"] / "raw" / "reacher", folder)
    assert ShardedSource(str(folder)).text_info is None
    text_embed_main([f"--input={folder}", "--text_encoder=tests.test_text_embeddings:vector_encoder",
                     "--no_progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["texts"], summary["dim"], summary["length"], summary["episodes"]) == (3, D, 1, 5)
    table = ShardedSource(str(folder)).text_embeddings()
    for text in TEXTS:                                   # one vector per text: L = 1, mask 1
        emb, mask = table.lookup(text)
        np.testing.assert_allclose(emb[0], np.mean([_word(w) for w in text.split()], 0), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mask, [1.0])
    with pytest.raises(SystemExit) as e:
        text_embed_main([f"--input={folder}", "--text_encoder=no_such_module:f"])
    assert e.value.code == 2 and "no_such_module" in capsys.readouterr().err


# -- the pipeline ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text_len", [2, 4])           # truncated (3 rows stored), zero-padded
def test_batches_carry_the_reference_rows_at_data_text_len(data, text_len):
    cfg = text_config(data["root"] / "data", text_len=text_len)
    batch = next(iter(build_dataset(cfg.data, cfg.phases.phase3_robot, seed=0, batch_size=4)))
    spec = batch_spec(cfg.data, 4)
    assert spec["text_embedding"].shape == (4, text_len, D) and spec["text_embedding_mask"].shape == (4, text_len)
    check_batch(batch, spec)
    by_letter = {t[0]: t for t in TEXTS}
    for b in range(4):
        text = by_letter[chr(batch["text"][b, 0] - 1)]   # the byte text names the episode's task
        emb, mask = reference(text, text_len)
        np.testing.assert_allclose(batch["text_embedding"][b], emb, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(batch["text_embedding_mask"][b], mask)


def test_config_mistakes_say_what_to_set_or_run(data, tmp_path):
    root = data["root"]
    cfg = text_config(root / "data")
    validate(cfg)
    cfg.data.text_embedding_dim = 4
    with pytest.raises(ConfigError, match="data.text_embedding_dim=4.*must equal model.text_embedding_dim=5"):
        validate(cfg)
    bytes_model = tiny_config()
    bytes_model.data.text_embedding_dim = 3
    with pytest.raises(ConfigError, match="must be 0 with model.text_encoder='bytes'"):
        validate(bytes_model)
    phase = cfg.phases.phase3_robot
    with pytest.raises(ConfigError, match="have D=5 features, but data.text_embedding_dim=4: set "
                                          "data.text_embedding_dim=5 and model.text_embedding_dim=5"):
        build_dataset(cfg.data, phase, seed=0, batch_size=2)
    cfg = text_config(root / "raw")
    with pytest.raises(ConfigError, match=r"holds no text embeddings.*python -m data_pipelines.text_embed --input="):
        build_dataset(cfg.data, phase, seed=0, batch_size=2)
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "data" / "reacher", mixed / "reacher")
    shutil.copytree(root / "data" / "reacher", mixed / "other")
    text_embed(str(mixed / "other"), "tests.test_text_embeddings:other_encoder", overwrite=True)
    cfg = text_config(mixed)
    cfg.phases.phase3_robot.mixture = {"reacher": 1.0, "other": 1.0}
    with pytest.raises(ConfigError, match="text embeddings of different encoders"):
        build_dataset(cfg.data, cfg.phases.phase3_robot, seed=0, batch_size=2)


# -- training and inference ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Two training steps of a tiny model reading the stored text embeddings; the run's workdir."""
    from kairos_jax.training import loop

    cfg = text_config(data["root"] / "data")
    cfg.eval.update(dict(every=2, root=str(data["root"] / "data"), clips_per_source=1, num_steps=1))   # held-out probe
    workdir = str(tmp_path_factory.mktemp("run"))
    results = loop.train_curriculum(cfg, workdir)
    return dict(cfg=cfg, workdir=workdir, results=results)


def test_a_tiny_model_trains_on_them_and_the_run_keeps_them(run):
    from kairos_jax.inference.checkpoints import find_checkpoint, load_training_text_embeddings
    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training import step as trainer

    with open(os.path.join(run["workdir"], "phase3_robot", "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    assert len(records) == 2 and np.isfinite([r["loss"] for r in records]).all()
    assert np.isfinite([records[1]["heldout_psnr/reacher"], records[1]["heldout_loss/reacher"]]).all()
    setup = trainer.build_model_setup(run["cfg"], create_mesh(run["cfg"].mesh))
    for key in ("text_embedding", "text_embedding_mask"):          # sharded over the batch like the others
        assert trainer.batch_sharding(setup, key).spec[0] == trainer.batch_sharding(setup, "text").spec[0]
    for folder in ("stats", "export/stats"):
        assert os.path.isfile(os.path.join(run["workdir"], folder, "reacher", "text_embeddings.json"))
    table = load_training_text_embeddings(find_checkpoint(run["workdir"]))
    assert table.texts == sorted(TEXTS) and table.directories[0].startswith(run["workdir"])


@pytest.fixture(scope="module")
def trained(run, tmp_path_factory):
    """The run's export with random parameters in place of its two steps' (whose zero-initialised text
    cross-attention has not opened yet: the text would not change any output): params, config.json and
    the run's stats/ (statistics and text embeddings), nothing else."""
    from flax import nnx

    from kairos_jax.inference.checkpoints import (
        find_checkpoint,
        load_config,
        load_model,
        load_training_stats,
        load_training_text_embeddings,
    )
    from kairos_jax.inference.rollout import make_engine
    from kairos_jax.training import checkpointing
    from tests.test_streaming import random_model

    export = tmp_path_factory.mktemp("served") / "export"
    shutil.copytree(os.path.join(run["workdir"], "export", "stats"), export / "stats")
    params = nnx.to_pure_dict(nnx.state(random_model(run["cfg"], seed=5, scale=0.3), nnx.Param))
    checkpointing.export_params(str(export), params, run["cfg"].to_json_best_effort())
    ref = find_checkpoint(str(export))
    cfg = load_config(ref)
    model = load_model(ref, cfg)
    return dict(ref=ref, cfg=cfg, model=model, engine=make_engine(model, cfg), stats=load_training_stats(ref),
                table=load_training_text_embeddings(ref))


def test_rollout_runs_the_model_with_the_reference_embedding(data, trained):
    from kairos_jax.inference.rollout import rollout

    cfg, engine = trained["cfg"], trained["engine"]
    ep = episode_clip(cfg.data, "reacher", "ep0", num_blocks=3, root=str(data["root"] / "data"),
                      text_embeddings=trained["table"])
    got = rollout(engine, cfg, ep, mode="simulate", context=2, steps=1, seed=0)["video"]
    for text, same in ((TEXTS[0], True), (TEXTS[1], False)):
        emb, mask = reference(text, cfg.data.text_len)
        ep.clip["text_embedding"], ep.clip["text_embedding_mask"] = emb, mask
        want = rollout(engine, cfg, ep, mode="simulate", context=2, steps=1, seed=0)["video"]
        assert np.array_equal(got, want) == same, text   # equal with its own text's rows only


def test_rollout_cli_names_a_task_text_without_embedding(data, trained, tmp_path, capsys):
    from kairos_jax import cli
    from kairos_jax import rollout as rollout_cli

    with pytest.raises(SystemExit) as e:
        cli.run(rollout_cli.main, ["rollout", f"--checkpoint={trained['ref'].path}", "--mode=closed_loop",
                                   "--steps=1", f"--out={tmp_path / 'x.mp4'}", "--source=reacher",
                                   f"--data_root={data['root'] / 'data'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: task text") and "has no stored embedding" in err


def test_evaluation_looks_texts_up_and_skips_what_has_none(data, trained, tmp_path):
    from kairos_jax.inference import evaluate as ev

    root = tmp_path / "heldout"
    shutil.copytree(data["root"] / "data" / "reacher", root / "reacher")
    write_episodes(str(root / "odd"), "odd", _episodes(["z unknown words"], seed=3))
    cfg, engine = trained["cfg"], trained["engine"]
    settings = ev.Settings(context=2, horizon=1, clips_per_source=1, closed_loop_episodes=1, closed_loop_batch=1)
    result = ev.evaluate(engine, cfg, str(root), settings, train_stats=trained["stats"], sources=["reacher", "odd"],
                         text_embeddings=trained["table"])
    assert sorted(result["skipped"]) == ["closed_loop/reacher", "open_loop/odd"]
    assert "'z unknown words' has no stored embedding" in result["skipped"]["open_loop/odd"]
    assert "task text" in result["skipped"]["closed_loop/reacher"] and result["closed_loop"] == {}
    assert np.isfinite(result["sources"]["reacher"]["simulate_psnr_by_step"]).all()
    batch = ev.heldout_batch(cfg, str(root), "reacher", clips=1, num_blocks=3, seed=0,
                             stats=trained["stats"]["reacher"], text_embeddings=trained["table"])
    text = {e.episode_id: e.text for e in _episodes([TEXTS[i % 3] for i in range(5)])}[batch["episode_ids"][0]]
    np.testing.assert_allclose(batch["text_embedding"][0], reference(text, cfg.data.text_len)[0], rtol=1e-6,
                               atol=1e-6)


def _reference_policy(trained, image, text_rows, seed=0) -> np.ndarray:
    """One policy request as the server runs it (tests/test_serve.py), with the text rows given."""
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.normalization import Normalizer
    from data_pipelines.pipeline import patchify, resize_frames

    cfg, engine = trained["cfg"], trained["engine"]
    d, emb = cfg.data, DEFAULT_REGISTRY.get("reacher")
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :emb.action_dim] = 1
    tokens = jnp.asarray(patchify(resize_frames(image[None], d.image_size), d.patch_size) / 127.5 - 1.0)
    text = (jnp.asarray(text_rows[0])[None], jnp.asarray(text_rows[1])[None])
    state = engine.start(text, jnp.asarray([emb.id]), jnp.asarray(dim_mask))
    key, k0 = jax.random.split(jax.random.key(seed))
    noise = jax.random.normal(k0, (1, d.action_chunk, d.action_dim)) * dim_mask[:, None]
    state = engine.commit(state, tokens, noise, np.zeros(1, np.float32), np.ones(1, np.float32))
    _, chunk, _, _ = engine.denoise(state, jax.random.split(key)[1], mode="policy")
    return Normalizer(trained["stats"]["reacher"]["reacher"].action).denormalize(np.asarray(chunk[0, :, :2]))


def test_serving_looks_prompts_up_embeds_new_ones_and_answers_unknown_ones(trained):
    from websockets.sync.client import connect

    from kairos_jax.inference import wire
    from kairos_jax.inference.checkpoints import CheckpointError
    from kairos_jax.inference.serving import Episode, RequestError, ServedModel, Server

    image = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    model = ServedModel.from_checkpoint(trained["ref"].path)
    request = {"observation/image": image, "prompt": TEXTS[1], "embodiment": "reacher"}
    got = model.handle(Episode(), request)["actions"]
    rows = reference(TEXTS[1], trained["cfg"].data.text_len)
    np.testing.assert_allclose(got, _reference_policy(trained, image, rows), rtol=1e-5, atol=1e-5)
    episode = Episode()
    with pytest.raises(RequestError, match="'d new prompt' has no precomputed text embedding.*--text_encoder"):
        model.handle(episode, {**request, "prompt": "d new prompt"})
    assert episode.state is None
    meta = model.metadata(1 << 20)["text"]
    assert meta == {"encoder": "precomputed", "text_encoder": ENCODER, "prompts": 3, "embeds_new_prompts": False}
    server = Server(model, host="127.0.0.1", port=0)
    host, port = server.start_in_thread()
    try:
        with connect(f"ws://{host}:{port}", compression=None, max_size=None) as ws:
            ws.recv()
            ws.send(wire.packb({**request, "prompt": "d new prompt"}))
            answer = ws.recv()
            assert isinstance(answer, str) and "has no precomputed text embedding" in answer
            ws.send(wire.packb(request))                 # the server keeps serving
            np.testing.assert_allclose(wire.unpackb(ws.recv())["actions"], got, rtol=1e-6)
    finally:
        server.stop_thread()
    # --text_encoder: new prompts embedded on the fly, as the reference computes them
    model = ServedModel.from_checkpoint(trained["ref"].path, text_encoder=ENCODER)
    got = model.handle(Episode(), {**request, "prompt": "d new prompt"})["actions"]
    rows = reference("d new prompt", trained["cfg"].data.text_len)
    np.testing.assert_allclose(got, _reference_policy(trained, image, rows), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="does not reproduce the text embeddings"):
        ServedModel.from_checkpoint(trained["ref"].path, text_encoder="tests.test_text_embeddings:other_encoder")
