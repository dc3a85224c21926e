"""`python -m kairos_jax.serve`: openpi's websocket protocol (kairos_jax/inference/serving.py).

Default suite: our msgpack_numpy packer against bytes written by hand from the msgpack spec and
openpi's documented map layout; the server (in this process) answers bad messages with errors
naming them and keeps serving; the command line's user errors.

Marker `openpi` (needs .venv-openpi, `make openpi-venv`): the server as a subprocess on a free
loopback port against the real openpi-client in its own virtualenv (tests/serve_client.py): one
episode equals an in-process StreamingEngine rollout of the same observations and seed, two
interleaved episodes equal the two run one after the other, every bad input gets an error naming
it, a bounded load test, and the simulate mode.
"""

import json
import os
import re
import struct
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.normalization import EmbodimentStats, Normalizer, NormStats, write_stats
from data_pipelines.pipeline import patchify, resize_frames, text_tokens, unpatchify
from kairos_jax import cli
from kairos_jax.inference import wire
from kairos_jax.inference.rollout import make_engine
from kairos_jax.inference.serving import ServedModel, Server, served_embodiments
from kairos_jax.training import checkpointing
from tests.conftest import tiny_config
from tests.test_streaming import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENPI_PYTHON = os.path.join(ROOT, ".venv-openpi", "bin", "python")


def needs_openpi(test):
    """Marker `openpi`, skipped without .venv-openpi."""
    skip = pytest.mark.skipif(not os.path.exists(OPENPI_PYTHON),
                              reason="needs .venv-openpi with the real openpi-client (make openpi-venv)")
    return pytest.mark.openpi(skip(test))


SEED = 3


# -- the model -------------------------------------------------------------------------------------

def config():
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.num_embodiments = 5            # reacher (id 2, 2 action dims) and pusher (id 4, 3)
    cfg.curriculum = ("phase3_robot",)
    return cfg


def training_stats(seed=0) -> dict:
    """{source: {embodiment: EmbodimentStats}} as a training run saves them; passive video has no
    actions and cannot be served."""
    r = np.random.default_rng(seed)
    stats = lambda d, scale: NormStats.compute(r.normal(0.5, scale, (500, d)))
    return {"reacher": {"reacher": EmbodimentStats(5, 500, stats(2, 2.0), stats(8, 1.0))},
            "pusher": {"pusher": EmbodimentStats(5, 500, stats(3, 0.3), stats(14, 1.0))},
            "passive_video": {"passive_camera": EmbodimentStats(5, 500, None, None)}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An export folder (params + config.json + stats/<source>/stats.json) of a random tiny model."""
    out = tmp_path_factory.mktemp("serve") / "run" / "export"
    cfg = config()
    model = random_model(cfg, seed=5, scale=0.2)
    checkpointing.export_params(str(out), nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg.to_json_best_effort())
    for source, per_emb in training_stats().items():
        os.makedirs(out / "stats" / source)
        write_stats(str(out / "stats" / source), per_emb)
    return dict(path=str(out), cfg=cfg, model=model)


def frames(seed, n, hw=(20, 28)):
    """n camera frames of an odd size (the server crops and resizes them as training did)."""
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def reference_policy(model, cfg, images, *, embodiment, prompt, seed=SEED, state=None, delta=None) -> np.ndarray:
    """The policy episode in process, as closed_loop runs it: block 0 = the first frame with its
    action chunk absent (noise at sigma 1), then every frame committed with the chunk answered
    before it (and with `state`, raw units, normalised with the training statistics, when given);
    actions denormalised with the training statistics; with `delta` (NormStats of delta actions),
    denormalised with those and added to the joint angles of `state` [n, p] at each chunk's start.
    [n, k, a] raw units."""
    from data_pipelines.embodiments import DEFAULT_REGISTRY

    d = cfg.data
    emb = DEFAULT_REGISTRY.get(embodiment)
    source = {"reacher": "reacher", "pusher": "pusher"}[embodiment]
    norm = Normalizer(training_stats()[source][embodiment].action)
    observed, raw_states = {}, None
    if state is not None and np.ndim(state) == 2:      # one state per request
        raw_states = np.asarray(state, np.float32)
    elif state is not None:
        proprio = Normalizer(training_stats()[source][embodiment].proprio).normalize(np.asarray(state, np.float32))
        observed = {"proprio": np.asarray(proprio, np.float32)[None]}
    engine = make_engine(model, cfg)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :emb.action_dim] = 1
    tokens = lambda f: jnp.asarray(patchify(resize_frames(f[None], d.image_size), d.patch_size) / 127.5 - 1.0)
    z, o = np.zeros(1, np.float32), np.ones(1, np.float32)
    state = engine.start(jnp.asarray(text_tokens(prompt, d.text_len))[None], jnp.asarray([emb.id]),
                         jnp.asarray(dim_mask))
    key, k0 = jax.random.split(jax.random.key(seed))
    chunk = jax.random.normal(k0, (1, d.action_chunk, d.action_dim)) * dim_mask[:, None]
    out = []
    proprio_norm = Normalizer(training_stats()[source][embodiment].proprio)
    for t, f in enumerate(images):
        if raw_states is not None:
            observed = {"proprio": proprio_norm.normalize(raw_states[t])[None]}
        state = engine.commit(state, tokens(f), chunk, z, o if t == 0 else z, **observed)
        key, kb = jax.random.split(key)
        _, chunk, _, _ = engine.denoise(state, kb, mode="policy")
        if delta is None:
            out.append(norm.denormalize(np.asarray(chunk[0, :, :emb.action_dim])))
        else:       # this request's joint angles (the reference of the pusher's joint targets)
            out.append(Normalizer(delta).denormalize(np.asarray(chunk[0, :, :emb.action_dim]))
                       + np.asarray(raw_states[t], np.float32)[None, list(emb.action_reference)])
    return np.stack(out)


# -- the wire format (default suite) ---------------------------------------------------------------

def test_packer_writes_openpis_layout_byte_for_byte():
    """Expected bytes written by hand from the msgpack spec (fixmap 0x8N, fixstr 0xaN, bin8 0xc4,
    true 0xc3, float64 0xcb, fixarray 0x9N) and openpi_client.msgpack_numpy's map: for an ndarray
    {b"__ndarray__": True, b"data": tobytes(), b"dtype": dtype.str, b"shape": shape}, for a numpy
    scalar {b"__npgeneric__": True, b"data": item(), b"dtype": dtype.str}, keys as bin."""
    obj = {"a": np.array([[1, 2, 3]], "<i2"), "s": np.float32(1.5)}
    expected = (b"\x82"
                b"\xa1a" b"\x84" b"\xc4\x0b__ndarray__" b"\xc3"
                b"\xc4\x04data" b"\xc4\x06\x01\x00\x02\x00\x03\x00"
                b"\xc4\x05dtype" b"\xa3<i2"
                b"\xc4\x05shape" b"\x92\x01\x03"
                b"\xa1s" b"\x83" b"\xc4\x0d__npgeneric__" b"\xc3"
                b"\xc4\x04data" b"\xcb" + struct.pack(">d", 1.5) +
                b"\xc4\x05dtype" b"\xa3<f4")
    assert wire.packb(obj) == expected
    back = wire.unpackb(expected)
    assert back["a"].dtype == np.dtype("<i2") and back["a"].shape == (1, 3)
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert type(back["s"]) is np.float32 and back["s"] == 1.5
    # a plain dict of str / int / float / None / bytes is plain msgpack
    assert wire.packb({"k": [1, -1, 0.5, None, b"\x07"]}) == (
        b"\x81\xa1k\x95\x01\xff\xcb" + struct.pack(">d", 0.5) + b"\xc0\xc4\x01\x07")


@pytest.mark.parametrize("x", [np.zeros((0, 3), np.float32), np.array(2.0),
                               np.arange(24, dtype=">u4").reshape(2, 3, 4), np.array([True, False]),
                               np.arange(12, dtype=np.uint8).reshape(2, 2, 3)[:, ::-1]])
def test_packer_round_trips_arrays(x):
    y = wire.unpackb(wire.packb({"x": x}))["x"]
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_unpacker_refuses_malformed_arrays_and_non_msgpack():
    arr = lambda kw: wire.packb({b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<f4", b"shape": [1], **kw})
    for message, match in [(b"\xc1", "not a msgpack message"), (b"\x92\x01", "not a msgpack message"),
                           (wire.packb(1) + b"\x01", "not a msgpack message"),
                           (arr({b"data": b"\x00" * 3}), "needs 4 bytes"),
                           (arr({b"dtype": "|O"}), "not allowed"), (arr({b"dtype": "<f4,<i4"}), "not allowed"),
                           (arr({b"dtype": "xyz"}), "not a numpy dtype"), (arr({b"shape": [-1]}), "shape"),
                           (arr({b"extra": 1}), "fields")]:
        with pytest.raises(wire.WireError, match=match):
            wire.unpackb(message)
    with pytest.raises(wire.WireError, match="refused"):
        wire.packb({"x": np.array([object()])})


# -- the server in process (default suite) ---------------------------------------------------------

@pytest.fixture(scope="module")
def in_process_server():
    """A policy server on a free loopback port in this process; nothing compiled (no warm-up)."""
    cfg = config()
    embodiments, refused = served_embodiments(cfg, training_stats())
    net = random_model(cfg, seed=5, scale=0.2)
    model = ServedModel(make_engine(net, cfg), cfg, embodiments, seed=SEED, name="tiny", refused=refused)
    server = Server(model, host="127.0.0.1", port=0, max_message_bytes=4096)
    host, port = server.start_in_thread()
    yield server, f"ws://{host}:{port}", net, cfg
    server.stop_thread()


def test_served_embodiments_follow_the_statistics_and_the_model():
    cfg = config()
    cfg.data.num_embodiments = 4
    served, refused = served_embodiments(cfg, training_stats())
    assert sorted(served) == ["reacher"]
    assert "outside the model's embodiment table" in refused["pusher"]
    assert "no actions" in refused["passive_camera"]
    assert served["reacher"].source == "reacher" and served["reacher"].proprio_norm is not None


def test_delta_action_model_answers_absolute_targets_from_the_requests_state():
    """A model trained with data.delta_actions: its pusher chunks are relative to the joint angles of
    the request's observation/state; the server answers delta + those angles (raw units), equal to an
    in-process reference, says so in its metadata, and refuses a request without the state."""
    from kairos_jax.inference.serving import Episode, RequestError

    cfg = config()
    cfg.model.proprio_input = True
    cfg.data.delta_actions = True
    r = np.random.default_rng(7)
    stats = training_stats()
    delta = NormStats.compute(r.normal(0.0, 0.05, (500, 3)))
    stats["pusher"]["pusher"] = EmbodimentStats(5, 500, stats["pusher"]["pusher"].action,
                                                stats["pusher"]["pusher"].proprio, delta, cfg.data.action_chunk)
    embodiments, refused = served_embodiments(cfg, stats)
    assert embodiments["pusher"].describe()["state_required"]
    assert not embodiments["reacher"].describe()["state_required"]
    net = random_model(cfg, seed=5, scale=0.2)
    model = ServedModel(make_engine(net, cfg), cfg, embodiments, seed=SEED, name="tiny", refused=refused)
    images, states = frames(11, 3), r.normal(0, 1, (3, 14)).astype(np.float32)
    episode = Episode()
    with pytest.raises(RequestError, match="relative to the robot's state"):
        model.handle(episode, {"observation/image": images[0], "prompt": "push", "embodiment": "pusher"})
    got = [model.handle(episode, {"observation/image": f, "observation/state": q, "prompt": "push",
                                  "embodiment": "pusher"})["actions"] for f, q in zip(images, states)]
    want = reference_policy(net, cfg, images, embodiment="pusher", prompt="push", state=states, delta=delta)
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)
    # without the state term the answer would differ by the joint angles
    assert np.abs(np.stack(got)[0] - Normalizer(delta).denormalize(np.zeros((2, 3)))).max() > 0.05
    # statistics without delta entries cannot serve a delta model's pusher
    _, refused = served_embodiments(cfg, training_stats())
    assert "action_delta" in refused["pusher"]


def test_server_answers_bad_messages_with_errors_and_keeps_serving(in_process_server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    server, uri, net, cfg = in_process_server
    image = frames(9, 1, (12, 12))[0]
    ok = {"observation/image": image, "prompt": "reach", "embodiment": "reacher"}
    bad = [
        ("text frame", "got a text frame"),
        (b"\xc1\x00", "not a msgpack message"),
        (wire.packb([1, 2]), "must be a map"),
        (wire.packb({"prompt": "reach", "embodiment": "reacher"}), "missing key 'observation/image'"),
        (wire.packb({**ok, "observation/wrist_image": image}), "unknown key(s) ['observation/wrist_image']"),
        (wire.packb({**ok, "observation/image": image.astype(np.float32)}), "has dtype float32; expected uint8"),
        (wire.packb({**ok, "observation/image": np.zeros((3, 8, 8), np.uint8)}), "has shape [3, 8, 8]"),
        (wire.packb({**ok, "observation/image": "pixels"}), "must be a numpy array"),
        (wire.packb({**ok, "embodiment": "r2d2"}), "unknown embodiment 'r2d2' (not registered)"),
        (wire.packb({**ok, "embodiment": "passive_camera"}), "unknown embodiment 'passive_camera' (no actions"),
        (wire.packb({"observation/image": image}), "missing key(s) ['prompt', 'embodiment']"),
        (wire.packb({**ok, "observation/state": np.zeros(3, np.float32)}), "has shape [3]; expected [8]"),
        (wire.packb({**ok, "observation/state": np.zeros(8, np.int32)}), "has dtype int32"),
        (wire.packb({**ok, "observation/state": np.full(8, np.nan, np.float32)}), "NaN or inf"),
        (wire.packb({**ok, "prompt": 7}), "'prompt' must be a string"),
        (wire.packb({"reset": True, "prompt": "x"}), "a reset is the map"),
    ]
    with connect(uri, compression=None, max_size=None) as ws:
        meta = wire.unpackb(ws.recv())
        assert meta["model"] == "tiny" and meta["mode"] == "policy" and meta["action_horizon"] == 2
        assert meta["embodiments"] == {
            "pusher": {"id": 4, "action_dim": 3, "proprio_dim": 14, "action_semantics": "joint_position",
                       "source": "pusher", "state_required": False},
            "reacher": {"id": 2, "action_dim": 2, "proprio_dim": 8, "action_semantics": "joint_torque",
                        "source": "reacher", "state_required": False}}
        assert meta["image_size"] == [8, 8] and meta["max_message_bytes"] == 4096
        for message, match in bad:          # one connection: each error keeps it open
            ws.send(message)
            answer = ws.recv()
            assert isinstance(answer, str) and answer.startswith("error: ") and match in answer, (match, answer)
        ws.send(wire.packb({"reset": True}))
        assert wire.unpackb(ws.recv()) == {"reset": True}
        # over the size limit: not read; the connection is closed with 1009 and the limit named
        ws.send(wire.packb({**ok, "observation/image": np.zeros((64, 64, 3), np.uint8)}))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv()
        assert e.value.rcvd.code == 1009 and "4096" in e.value.rcvd.reason, e.value
    with connect(uri, compression=None, max_size=None) as ws:      # the next client is served
        assert wire.unpackb(ws.recv())["model"] == "tiny"
        ws.send(wire.packb({"observation/image": image}))
        assert "missing key(s)" in ws.recv()
        got = []
        for _ in range(2):      # an error between two steps leaves the episode as it was
            ws.send(wire.packb(ok))
            answer = wire.unpackb(ws.recv())
            assert answer["actions"].dtype == np.float32 and answer["actions"].shape == (2, 2)
            assert answer["server_timing"]["infer_ms"] > 0
            got.append(answer["actions"])
            ws.send(wire.packb({**ok, "embodiment": "pusher"}))
            assert "embodiment changed within an episode ('reacher' -> 'pusher')" in ws.recv()
    want = reference_policy(net, cfg, [image, image], embodiment="reacher", prompt="reach")
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-5)
    assert server.requests == 3       # the reset and the two steps
    # openpi's health check
    import urllib.request

    with urllib.request.urlopen(uri.replace("ws://", "http://") + "/healthz", timeout=30) as r:
        assert r.status == 200 and r.read() == b"OK\n"


def run_serve_cli(argv):
    from kairos_jax import serve as serve_cli

    with pytest.raises(SystemExit) as e:
        cli.run(serve_cli.main, ["serve"] + argv)
    return e.value.code or 0


def test_cli_user_errors_exit_2_with_one_line(tmp_path, checkpoint, capsys):
    assert run_serve_cli([]) == 2
    assert capsys.readouterr().err.strip() == "error: --checkpoint is required"
    assert run_serve_cli([f"--checkpoint={checkpoint['path']}", "--mode=video_prediction"]) == 2
    assert "serve takes one of ['policy', 'simulate']" in capsys.readouterr().err
    assert run_serve_cli([f"--checkpoint={checkpoint['path']}", "--port=70000"]) == 2
    capsys.readouterr()
    # an export without training statistics: nothing to normalise with
    bare = tmp_path / "bare"
    checkpointing.export_params(str(bare), nnx.to_pure_dict(nnx.state(checkpoint["model"], nnx.Param)),
                                checkpoint["cfg"].to_json_best_effort())
    assert run_serve_cli([f"--checkpoint={bare}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no training statistics" in err[0] and "--data_root" in err[0]


# -- against the real openpi-client (marker openpi) ------------------------------------------------

class ServerProcess:
    """`python -m kairos_jax.serve` on a free loopback port (--port=0, read from its first line);
    stopped (SIGTERM) by `stop`, and by itself after 10 idle minutes should the test die first."""

    def __init__(self, checkpoint: str, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kairos_jax.serve", f"--checkpoint={checkpoint}", "--port=0", f"--seed={SEED}",
             "--exit_after_idle_s=600", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # JAX_PLATFORMS=cpu: where the AOT tools' CUDA plugin is installed (CI's later stages), a JAX
            # start on a machine without cuDNN logs a plugin traceback that the log checks would catch.
            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()        # blocks until it serves (or dies)
        m = re.search(r"ws://([^\s]+):(\d+)", line)
        if not m:
            self.proc.wait(30)
            raise AssertionError(f"server did not start: {line!r}\n{''.join(self.stderr)[-3000:]}")
        self.host, self.port = m.group(1), int(m.group(2))

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, "".join(self.stderr)[-3000:]
        return out


def run_client(server: ServerProcess, tmp_path, name: str, arrays: dict | None = None, **spec) -> tuple[dict, dict]:
    """tests/serve_client.py in .venv-openpi; returns (its JSON, its arrays)."""
    npz = tmp_path / f"{name}_in.npz"
    np.savez(npz, **(arrays or {}))
    spec_path, out = tmp_path / f"{name}.json", tmp_path / f"{name}_out.json"
    spec_path.write_text(json.dumps({"host": server.host, "port": server.port, "arrays": str(npz), **spec}))
    proc = subprocess.run([OPENPI_PYTHON, os.path.join(ROOT, "tests", "serve_client.py"), str(spec_path), str(out)],
                          capture_output=True, text=True, timeout=600, env={"PATH": os.environ.get("PATH", "")})
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(server.stderr)[-3000:]
    with np.load(str(out) + ".npz") as z:
        return json.loads(out.read_text()), dict(z)


@pytest.fixture(scope="module")
def policy_server(checkpoint):
    server = ServerProcess(checkpoint["path"])
    yield server
    assert "stopped after" in server.stop()
    log = "".join(server.stderr)
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]     # every failure was the client's


def episode_steps(client: str, images_key: str, n: int, *, embodiment: str, prompt: str, state_dim=None):
    steps = []
    for t in range(n):
        request = {"observation/image": f"@{images_key}{t}", "prompt": prompt, "embodiment": embodiment}
        if state_dim:
            request["observation/state"] = f"@state{state_dim}"
        steps.append({"client": client, "request": request})
    return steps


def image_arrays(key, seed, n, hw=(20, 28)):
    return {f"{key}{t}": f for t, f in enumerate(frames(seed, n, hw))}


@needs_openpi
def test_openpi_packer_and_ours_agree_byte_for_byte(tmp_path):
    def pack_object():       # the same object as tests/serve_client.py's pack_object
        return {"observation/image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
                "observation/state": np.array([0.5, -1.25], np.float32), "big_endian": np.array([1, 2], ">i2"),
                "flags": np.array([True, False]), "scalar": np.float32(1.5), "int": np.int64(-7),
                "prompt": "pick up the cube", "nested": {"list": [1, 2.5, None, True], "bytes": b"\x00\x01"}}

    class Nobody:
        host, port, stderr = "127.0.0.1", 0, []

    ours = wire.packb(pack_object()).hex()
    out, _ = run_client(Nobody, tmp_path, "pack", pack=True, unpack=ours)
    assert out["pack"] == ours and out["unpack_equal"]
    back = wire.unpackb(bytes.fromhex(out["pack"]))
    for k, v in pack_object().items():
        if k != "nested":
            assert np.asarray(back[k]).dtype == np.asarray(v).dtype and np.array_equal(back[k], v)


@needs_openpi
def test_openpi_episode_equals_the_in_process_rollout(policy_server, checkpoint, tmp_path):
    n = 6
    # the reacher's state: cos (2) and sin (2) of its joint angles, velocities (2), fingertip-to-target (2)
    arrays = {**image_arrays("a", 0, n),
              "state8": np.array([0.995, 0.98, 0.1, -0.2, 0.3, 2.0, 0.05, -0.1], np.float64)}
    out, got = run_client(policy_server, tmp_path, "episode", arrays,
                          steps=episode_steps("c", "a", n, embodiment="reacher", prompt="reach the target",
                                              state_dim=8))
    meta = out["metadata"]["c"]
    assert meta["action_horizon"] == 2 and meta["image_size"] == [8, 8] and meta["mode"] == "policy"
    assert meta["embodiments"]["reacher"]["action_dim"] == 2
    actions = np.stack([got[f"{t}/actions"] for t in range(n)])
    assert actions.dtype == np.float32 and actions.shape == (n, 2, 2) and np.all(np.isfinite(actions))
    for step in out["steps"]:
        assert step["answer"]["actions"] == {"dtype": "<f4", "shape": [2, 2]}
        assert step["answer"]["server_timing"]["infer_ms"] > 0
    want = reference_policy(checkpoint["model"], checkpoint["cfg"], frames(0, n), embodiment="reacher",
                            prompt="reach the target", state=arrays["state8"])
    np.testing.assert_allclose(actions, want, rtol=1e-5, atol=1e-5)
    # the model takes the state (model.proprio_input): without it the answers differ
    blind = reference_policy(checkpoint["model"], checkpoint["cfg"], frames(0, n), embodiment="reacher",
                             prompt="reach the target")
    assert np.abs(blind - want).max() > 1e-3
    assert np.all(np.abs(np.diff(actions, axis=0)).max(axis=(1, 2)) > 1e-3)     # each step its own answer
    # raw units: the reacher's statistics (centre 0.5, spread ~2) put the chunk far from [-1, 1]
    norm = Normalizer(training_stats()["reacher"]["reacher"].action)
    assert np.all(np.abs(norm.normalize(actions)) < norm.clip)
    assert not np.allclose(actions, norm.normalize(actions))


@needs_openpi
def test_openpi_interleaved_episodes_equal_sequential_ones(policy_server, tmp_path):
    n = 4
    arrays = {**image_arrays("a", 1, n), **image_arrays("b", 2, n, hw=(30, 12))}
    a = episode_steps("a", "a", n, embodiment="reacher", prompt="reach")
    b = episode_steps("b", "b", n, embodiment="pusher", prompt="push the puck")
    inter, got_i = run_client(policy_server, tmp_path, "inter", arrays, steps=[s for ab in zip(a, b) for s in ab])
    _, got_a = run_client(policy_server, tmp_path, "seq_a", arrays, steps=a)
    _, got_b = run_client(policy_server, tmp_path, "seq_b", arrays, steps=b)
    for t in range(n):
        np.testing.assert_array_equal(got_i[f"{2 * t}/actions"], got_a[f"{t}/actions"])
        np.testing.assert_array_equal(got_i[f"{2 * t + 1}/actions"], got_b[f"{t}/actions"])
        assert got_b[f"{t}/actions"].shape == (2, 3)
    # a reset on the same connection starts the episode over: the same answers again
    again, got_r = run_client(policy_server, tmp_path, "reset", arrays,
                              steps=a[:2] + [{"client": "a", "request": {"reset": True}}] + a[:2])
    assert again["steps"][2] == {"answer": {"reset": True}}
    np.testing.assert_array_equal(got_r["3/actions"], got_a["0/actions"])
    np.testing.assert_array_equal(got_r["4/actions"], got_a["1/actions"])


@needs_openpi
def test_openpi_bad_inputs_get_errors_and_the_server_keeps_serving(policy_server, tmp_path):
    img = "@a0"
    ok = {"observation/image": img, "prompt": "reach", "embodiment": "reacher"}
    arrays = {**image_arrays("a", 3, 3), "float_image": frames(3, 1)[0].astype(np.float32),
              "chw": np.zeros((3, 20, 28), np.uint8), "state3": np.zeros(3, np.float32),
              "state4i": np.zeros(8, np.int64), "junk": np.frombuffer(b"\xc1\xc1junk", np.uint8),
              "list": np.frombuffer(wire.packb([1, 2, 3]), np.uint8),
              "huge": np.zeros((2500, 2500, 3), np.uint8)}
    cases = [
        ({"request": {"prompt": "reach", "embodiment": "reacher"}}, "missing key 'observation/image'"),
        ({"request": {**ok, "observation/wrist_image": img}}, "unknown key(s) ['observation/wrist_image']"),
        ({"request": {**ok, "observation/image": "@float_image"}}, "has dtype float32; expected uint8"),
        ({"request": {**ok, "observation/image": "@chw"}}, "has shape [3, 20, 28]"),
        ({"request": {**ok, "embodiment": "r2d2"}}, "unknown embodiment 'r2d2'"),
        ({"request": {**ok, "observation/state": "@state3"}}, "has shape [3]; expected [8]"),
        ({"request": {**ok, "observation/state": "@state4i"}}, "has dtype int64"),
        ({"raw": "@junk"}, "not a msgpack message"),
        ({"raw": "@list"}, "must be a map"),
        ({"text": "hello"}, "got a text frame"),
    ]
    steps = [{"client": "x", **c} for c, _ in cases]
    steps.append({"client": "x", "request": ok})                            # same connection, served
    steps.append({"client": "x", "request": {**ok, "embodiment": "pusher"}})  # mid-episode change
    steps.append({"client": "x", "request": {**ok, "observation/image": "@huge"}})   # 18 MB > 16 MiB
    steps.append({"vanish": ok})                                             # leaves before its answer
    steps += episode_steps("y", "a", 3, embodiment="reacher", prompt="reach")   # the next client
    out, got = run_client(policy_server, tmp_path, "bad", arrays, steps=steps)
    results = out["steps"]
    for (case, match), r in zip(cases, results):
        assert "error" in r and match in r["error"], (case, match, r)
        assert r["error"].startswith("Error in inference server:\nerror: ") or r["error"].startswith("error: ")
    i = len(cases)
    assert results[i]["answer"]["actions"]["shape"] == [2, 2]
    assert "embodiment changed within an episode" in results[i + 1]["error"]
    assert results[i + 2]["code"] == 1009 and str(16 << 20) in results[i + 2]["closed"], results[i + 2]
    assert results[i + 3] == {"vanished": True}
    fresh = np.stack([got[f"{i + 4 + t}/actions"] for t in range(3)])
    _, ref = run_client(policy_server, tmp_path, "bad_ref", arrays,
                        steps=episode_steps("z", "a", 3, embodiment="reacher", prompt="reach"))
    np.testing.assert_array_equal(fresh, np.stack([ref[f"{t}/actions"] for t in range(3)]))
    # the first error-free request of "x" came after nine errors: the episode was untouched by them
    np.testing.assert_array_equal(got[f"{i}/actions"], ref["0/actions"])


@needs_openpi
def test_openpi_load_4_clients_x_20_requests(policy_server, checkpoint, tmp_path):
    n = 5
    arrays = {**image_arrays("a", 4, n), **image_arrays("b", 5, n, hw=(48, 64))}
    eps = [[{"observation/image": f"@{e}{t}", "prompt": p, "embodiment": emb} for t in range(n)]
           for e, p, emb in (("a", "reach", "reacher"), ("b", "push", "pusher"))]
    t0 = time.perf_counter()
    out, got = run_client(policy_server, tmp_path, "load", arrays, load={"clients": 4, "requests": 20, "episodes": eps})
    assert time.perf_counter() - t0 < 600
    lat = np.concatenate(out["load"]["latency_ms"])
    assert lat.shape == (80,) and np.all(np.isfinite(lat))
    assert got["load/0"].shape == (20, 2, 2) and got["load/1"].shape == (20, 2, 3)
    # clients 0 and 2 ran the same episode at the same time, as did 1 and 3: never mixed up
    np.testing.assert_array_equal(got["load/0"], got["load/2"])
    np.testing.assert_array_equal(got["load/1"], got["load/3"])
    cycled = [frames(4, n)[t % n] for t in range(8)]
    want = reference_policy(checkpoint["model"], checkpoint["cfg"], cycled, embodiment="reacher", prompt="reach")
    np.testing.assert_allclose(got["load/0"][:8], want, rtol=1e-5, atol=1e-5)


@needs_openpi
def test_openpi_simulate_episode_equals_the_in_process_rollout(checkpoint, tmp_path):
    from data_pipelines.embodiments import DEFAULT_REGISTRY

    cfg, n = checkpoint["cfg"], 4
    d = cfg.data
    r = np.random.default_rng(7)
    chunks = r.normal(0.5, 0.3, (n, d.action_chunk, 3)).astype(np.float32)
    arrays = {"f0": frames(6, 1, (16, 16))[0], **{f"act{t}": chunks[t] for t in range(n)}}
    steps = [{"client": "s", "request": {"actions": f"@act{t}", **({"observation/image": "@f0", "prompt": "push",
                                                                    "embodiment": "pusher"} if t == 0 else {})}}
             for t in range(n)]
    steps.append({"client": "s", "request": {"actions": "@act0", "observation/image": "@f0"}})
    server = ServerProcess(checkpoint["path"], "--mode=simulate")
    try:
        out, got = run_client(server, tmp_path, "simulate", arrays, steps=steps)
    finally:
        server.stop()
    assert out["metadata"]["s"]["mode"] == "simulate"
    pred = np.stack([got[f"{t}/observation/image"] for t in range(n)])
    assert pred.dtype == np.uint8 and pred.shape == (n, 8, 8, 3)
    assert "only taken by the first request" in out["steps"][n]["error"]
    # in process: the first frame committed with its chunk absent, then one simulate step per chunk
    emb = DEFAULT_REGISTRY.get("pusher")
    norm = Normalizer(training_stats()["pusher"]["pusher"].action)
    engine = make_engine(checkpoint["model"], cfg)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :3] = 1
    state = engine.start(jnp.asarray(text_tokens("push", d.text_len))[None], jnp.asarray([emb.id]),
                         jnp.asarray(dim_mask))
    key, k0 = jax.random.split(jax.random.key(SEED))
    video0 = jnp.asarray(patchify(resize_frames(arrays["f0"][None], d.image_size), d.patch_size) / 127.5 - 1.0)
    state = engine.commit(state, video0, jax.random.normal(k0, (1, d.action_chunk, d.action_dim)) * dim_mask[:, None],
                          np.zeros(1, np.float32), np.ones(1, np.float32))
    for t in range(n):
        key, kb = jax.random.split(key)
        a = np.zeros((1, d.action_chunk, d.action_dim), np.float32)
        a[0, :, :3] = norm.normalize(chunks[t])
        state, video, _ = engine.step(state, kb, mode="simulate", actions=a)
        want = unpatchify(np.asarray(video), d.image_size, d.patch_size, 3)[0]
        assert np.abs(pred[t].astype(int) - want.astype(int)).max() <= 1      # rounding of equal floats


@pytest.mark.slow
def test_benchmark_script_runs_end_to_end(tmp_path):
    """benchmarks/serve.py on a few requests (its figures are reported, not asserted)."""
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", f"--out={out}", "--requests=8",
                           "--concurrency=1,2", "--soak=40", "--rss_every=10"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["clients"] for r in result["concurrency"]] == [1, 2]
    assert all(r["requests"] == 8 and r["p99_ms"] >= r["p50_ms"] > 0 for r in result["concurrency"])
    assert result["soak"]["requests"] == 40 and len(result["soak"]["rss_mb"]) == 4
