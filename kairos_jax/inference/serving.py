"""Serving a trained world model over openpi's websocket protocol: as a policy, or as a simulator.

The command line is `python -m kairos_jax.serve` (kairos_jax/serve.py); this module is the server.

Protocol (openpi's `WebsocketPolicyServer` / `openpi_client.WebsocketClientPolicy`)
----------------------------------------------------------------------------------
A websocket server (no compression); every message is binary msgpack with numpy arrays in
openpi's `msgpack_numpy` encoding (kairos_jax/inference/wire.py).

- On connect the server sends its metadata map: "model", "checkpoint", "step", "mode" (the one this
  server runs) and "modes" (those it can run), "embodiments" (name -> {"id", "action_dim",
  "proprio_dim", "action_semantics", "source"}), "action_horizon" (k), "action_dim" (the padded
  width the model works in), "image_size" ([H, W] of the model's frames), "text_len", "text" (how
  prompts are read; see "Prompts" below), "max_message_bytes", "seed", "protocol".
- Then each request is one map and each answer one map, in order.
- `GET /healthz` answers 200 "OK" (as openpi's server).

Each connection is one episode: the server keeps that connection's streaming state (the
StreamingEngine caches, docs/architecture.md §7) and its random key, so per-request cost and
memory are constant however long the episode runs (for the hybrid model; a model with "full"
attention layers keeps every block and grows its cache by doubling). `{"reset": true}` starts a
new episode on the same connection (answer `{"reset": true}`); so does a new connection.

Policy mode (`--mode=policy`), request keys:

    "observation/image"  uint8 [H, W, 3], any size: centre-cropped and area-resized to the model's
                         frames exactly as in training (data_pipelines.pipeline.resize_frames)
    "observation/state"  float [P] raw units, optional, P = the embodiment's proprio dims: checked
                         (shape, float dtype, finite) and normalised with the checkpoint's
                         statistics. A model trained with model.proprio_input takes it with the
                         frame (the next chunk's state input; absent when not sent); any other
                         model ignores it.
    "prompt"             str, the task text (UTF-8 bytes, truncated to the model's text_len; for a model
                         reading precomputed text embeddings, see "Prompts" below)
    "embodiment"         str, a registry name among the metadata's "embodiments"

"prompt" and "embodiment" are required on the first request of an episode; later requests may
repeat them (they must not change: reset first). Answer:

    {"actions": float32 [k, A_embodiment] raw units (denormalised with the checkpoint's statistics),
     "server_timing": {"infer_ms", "queue_ms", and from the second request "prev_total_ms"}}

Step t of an episode is the block [a_{t-1} | o_t] (docs/architecture.md §2), as `closed_loop`
(kairos_jax/inference/rollout.py) runs it: with key = jax.random.key(seed) at the episode's start,

    t = 0:  state = start(prompt, embodiment); key, k0 = split(key)
            commit(o_0, actions = normal(k0, [1, k, A]) * dim_mask at sigma 1)   (absent chunk)
    t > 0:  commit(o_t, the normalised chunk answered at t - 1, at sigma 0); with the config's
            rollout.policy_history = "absent": key, kh = split(key) first, and noise normal(kh) at sigma 1
            in its place (StreamingEngine.commit_policy)
    then    key, kb = split(key); chunk = denoise(kb, mode="policy"); answer denormalize(chunk)

Simulate mode (`--mode=simulate`: forward dynamics, the world model the other way round), request
keys "actions" (float [k, A_embodiment] raw units, normalised with the checkpoint's statistics),
and on the first request of an episode also "observation/image", "prompt" and "embodiment" (the
frame to start from; later requests take no image: the model's own frames are the history).
"observation/state" is taken with the first frame as above. t = 0 commits o_0 as in policy mode; every
request then runs key, kb = split(key); step(kb, mode="simulate", actions) (denoise and commit the
predicted frame) and answers {"observation/image": uint8 [H_model, W_model, 3], "server_timing"}.

A model on tokenizer latents (config data.tokenizer; kairos_jax/inference/latents.py) is served on
frames all the same: the metadata's "image_size" is the tokenizer's pixel frame size and its "video"
map says {"kind": "latents", "tokenizer", "temporal_stride": s, "frames_per_request": k}. Every image
is resized to that size and encoded by the tokenizer's streaming encoder, whose state (constant size)
is the episode's, as the converter encoded the training data. The first image of an episode is
encoded alone (frame 0); a later policy request covers one block, i.e. the k = data.action_chunk
frames since the previous request (k = s in the real configs): "observation/image" is either one
uint8 [H, W, 3] image, taken as all k of them (repeated k times for the encoder), or the stack
uint8 [k, H, W, 3] of them, oldest first (on the first request a stack's last image is used). The
block's token is the latent of the last s frames, normalised with the latent statistics of the
embodiment's training source. In simulate mode the predicted latents are decoded with the
tokenizer's streaming decoder (its state also the episode's; the first frame's latent primes it),
and the answer holds "observation/image" (the block's frame, the last decoded) and
"observation/frames" (uint8 [s, H, W, 3], every frame the block's latent decodes to).

Prompts of a model reading precomputed text embeddings (model.text_encoder = "precomputed"): the
prompt is looked up in the text embeddings the run was trained with (stats/<source>/
text_embeddings.json beside its config; data_pipelines/text_embeddings.py) and its stored rows, the
first text_len of them or zero-padded to it, are the model's text, exactly as in training. A prompt the
table does not hold is answered with an error naming it (the connection and its episode stay as they
were), unless the server was started with `--text_encoder=module:function`: then new prompts are
embedded on the fly by that function (once each, kept for later episodes). The server checks at start
that the function reproduces the stored embeddings of a few of the table's texts. The metadata's
"text" map says {"encoder": "bytes"} or {"encoder": "precomputed", "text_encoder", "prompts": the
number of stored texts, "embeds_new_prompts": bool}.

Errors: a request the server cannot use (not msgpack, not a map, a missing or unknown key, a wrong
dtype or shape, an unknown embodiment, a changed prompt) is answered with a text frame
"error: <what>" and the connection stays open with its episode unchanged (openpi's client raises
RuntimeError("Error in inference server:\\n" + text) on a text frame). A message larger than
max_message_bytes is not read: the connection is closed with code 1009 (message too big) and a
reason naming the limit. A client that disconnects mid-request loses its episode; nobody else
notices. An unexpected failure inside the model is answered "error: internal error ..." and ends
that connection's episode (its state may have been consumed), not the server.

Concurrency: requests of all connections go through one worker thread, in arrival order (a FIFO
queue in front of the engine), so the jitted functions are never called concurrently and each
connection's state is its own object. Episodes cannot share a batch: the engine's block index
(RoPE position) is one scalar per state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import storage
from data_pipelines.embodiments import DEFAULT_REGISTRY, EmbodimentRegistry
from data_pipelines.normalization import ActionCodec, Normalizer
from data_pipelines.pipeline import ConfigError, text_tokens
from data_pipelines.text_embeddings import (
    TextEmbeddingError,
    TextEmbeddings,
    encode_texts,
    load_text_encoder,
    pad_rows,
)
from kairos_jax.inference import wire
from kairos_jax.inference.checkpoints import CheckpointError
from kairos_jax.inference.latents import VideoCodec, video_codec
from kairos_jax.inference.streaming import StreamingEngine

log = logging.getLogger("kairos.serve")

MODES = ("policy", "simulate")
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
PROTOCOL = "openpi-websocket+msgpack_numpy (kairos serve v1)"
IMAGE, STATE, PROMPT, EMBODIMENT, ACTIONS, RESET = ("observation/image", "observation/state", "prompt",
                                                    "embodiment", "actions", "reset")
MAX_EMBEDDED_PROMPTS = 4096       # prompts embedded on the fly (--text_encoder) kept for later episodes
FRAMES = "observation/frames"      # simulate answers of a tokenizer model: every decoded frame of the block
REQUEST_KEYS = {"policy": (IMAGE, STATE, PROMPT, EMBODIMENT), "simulate": (ACTIONS, IMAGE, STATE, PROMPT, EMBODIMENT)}


class BindError(OSError):
    """The server's address cannot be bound (in use, not local, no permission)."""


class RequestError(ValueError):
    """A request the server cannot use; the message (sent back to the client) says what and why."""


@dataclasses.dataclass(frozen=True)
class ServedEmbodiment:
    name: str
    id: int
    action_dim: int
    proprio_dim: int
    action_semantics: str
    source: str                        # the training source whose statistics are used
    action_codec: ActionCodec          # raw action chunks <-> the model's units (delta or absolute)
    proprio_norm: Normalizer | None

    def describe(self) -> dict:
        # state_required: the model's actions are relative to the robot's state (data.delta_actions),
        # so every request needs observation/state; answers are absolute, in raw units, regardless
        return {"id": self.id, "action_dim": self.action_dim, "proprio_dim": self.proprio_dim,
                "action_semantics": self.action_semantics, "source": self.source,
                "state_required": bool(self.action_codec.is_delta)}


def served_embodiments(cfg, train_stats: dict, registry: EmbodimentRegistry = DEFAULT_REGISTRY
                       ) -> tuple[dict[str, ServedEmbodiment], dict[str, str]]:
    """The embodiments a model can serve, from the statistics it was trained with
    ({source: {embodiment: EmbodimentStats}}): registered, with actions and action statistics, an id
    inside the model's embodiment table and at most data.action_dim action dims. An embodiment seen
    in several sources takes the statistics of the source with the most steps. Returns (served,
    {name: why not} for the others that the statistics name)."""
    served, refused = {}, {}
    candidates: dict[str, list] = {}
    for source, per_emb in sorted(train_stats.items()):
        for name, s in per_emb.items():
            candidates.setdefault(name, []).append((s.steps, source, s))
    for name, options in sorted(candidates.items()):
        steps, source, s = max(options, key=lambda o: (o[0], o[1]))
        if name not in registry:
            refused[name] = "not in the embodiment registry"
            continue
        e = registry.get(name)
        delta = bool(cfg.data.get("delta_actions", False))
        if e.action_dim == 0 or s.action is None:
            refused[name] = "no actions (action-free source)"
        elif e.id >= cfg.data.num_embodiments:
            refused[name] = f"id {e.id} is outside the model's embodiment table ({cfg.data.num_embodiments})"
        elif e.action_dim > cfg.data.action_dim:
            refused[name] = f"{e.action_dim} action dims > the model's data.action_dim {cfg.data.action_dim}"
        elif s.action.dim != e.action_dim:
            refused[name] = f"its action statistics have {s.action.dim} dims, the registry says {e.action_dim}"
        else:
            try:
                codec = ActionCodec.for_stats(s, e.action_reference, delta)
            except ValueError as err:
                refused[name] = str(err)
                continue
            proprio = s.proprio if s.proprio is not None and s.proprio.dim == e.proprio_dim else None
            served[name] = ServedEmbodiment(name, e.id, e.action_dim, e.proprio_dim, e.action_semantics, source,
                                            codec, None if proprio is None else Normalizer(proprio))
    return served, refused


@dataclasses.dataclass
class Episode:
    """One connection's rollout: the engine state (None before the first observation), its key,
    the last answered chunk (normalised, [1, k, A]), and what the episode was started with."""

    state: object = None
    key: jax.Array | None = None
    chunk: jax.Array | None = None
    embodiment: ServedEmbodiment | None = None
    prompt: str | None = None
    blocks: int = 0
    seen: object = None                # a tokenizer model: the streaming encoder's state
    decoder: object = None             # a tokenizer model in simulate mode: its StreamDecoder


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of dtype {x.dtype} and shape {list(x.shape)}"
    return f"a {type(x).__name__}"


class ServedModel:
    """The model behind the server: validates requests and runs episodes on the streaming engine.
    Not thread-safe: the server calls `handle` from one worker thread."""

    def __init__(self, engine: StreamingEngine, cfg, embodiments: dict[str, ServedEmbodiment], *, mode: str = "policy",
                 seed: int = 0, name: str = "model", checkpoint: str = "", step: int | None = None,
                 refused: dict[str, str] | None = None, latent_stats: dict | None = None,
                 text_embeddings: TextEmbeddings | None = None, text_encoder: str | None = None):
        """latent_stats: {source: LatentStats} the model was trained with, for a model on tokenizer
        latents (each embodiment's tokens are normalised with its source's). text_embeddings: the
        table a model reading precomputed text was trained with; text_encoder: "module:function"
        embedding prompts the table lacks (module docstring, "Prompts")."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        d = cfg.data
        self.tokenizer = d.get("tokenizer", "")
        if not self.tokenizer and d.get("channels", 3) != 3:
            raise CheckpointError(f"this model takes {d.channels}-channel inputs (latents?); the server feeds "
                                  f"RGB frames and its config names no tokenizer (data.tokenizer) to encode them")
        self.text_table, self.text_encoder, self._encode = text_embeddings, text_encoder, None
        self._embedded: dict[str, tuple[np.ndarray, np.ndarray]] = {}     # prompts embedded on the fly
        if cfg.model.text_encoder == "precomputed":
            self._check_text(cfg, checkpoint or name)
        if not embodiments:
            why = "; ".join(f"{k}: {v}" for k, v in sorted((refused or {}).items())) or "no statistics"
            raise CheckpointError(f"{checkpoint or name}: no embodiment can be served ({why})")
        self.engine, self.cfg, self.embodiments = engine, cfg, embodiments
        self.mode, self.seed, self.name, self.checkpoint, self.step = mode, int(seed), name, checkpoint, step
        self.refused = dict(refused or {})
        self.k, self.A = d.action_chunk, d.action_dim
        self.codecs: dict[str, VideoCodec] = {}
        for e_name, emb in embodiments.items():
            stats = (latent_stats or {}).get(emb.source)
            if self.tokenizer and stats is None:
                raise CheckpointError(f"{checkpoint or name}: no latent statistics of source {emb.source} (the "
                                      f"{e_name} statistics' source): a model on {self.tokenizer}'s latents needs "
                                      f"stats/{emb.source}/latent_stats.json beside its config")
            try:
                self.codecs[e_name] = video_codec(cfg, stats)
            except ConfigError as err:
                raise CheckpointError(f"{checkpoint or name}: {err}") from None
        codec = next(iter(self.codecs.values()))
        self.height, self.width = codec.height, codec.width

    def _check_text(self, cfg, where: str) -> None:
        """A model reading precomputed text: its table (and --text_encoder, checked against the table)."""
        D = cfg.model.text_embedding_dim
        table = self.text_table
        if table is None and not self.text_encoder:
            raise CheckpointError(f"{where}: this model reads precomputed text embeddings (model.text_encoder="
                                  f"'precomputed') and its run keeps none (stats/<source>/text_embeddings.json, "
                                  f"written by kairos_jax.train); give --text_encoder=module:function to embed prompts")
        if table is not None and table.dim != D:
            raise CheckpointError(f"{where}: its text embeddings have D={table.dim}, model.text_embedding_dim={D}")
        if not self.text_encoder:
            return
        try:
            self._encode = load_text_encoder(self.text_encoder)
        except (ValueError, ImportError) as e:
            raise CheckpointError(str(e)) from None
        probe = table.texts[:4] if table is not None else [""]
        try:
            emb, mask = encode_texts(self._encode, probe, self.text_encoder)
        except TextEmbeddingError as e:
            raise CheckpointError(str(e)) from None
        if emb.shape[2] != D:
            raise CheckpointError(f"--text_encoder={self.text_encoder} gives D={emb.shape[2]} features, the model "
                                  f"reads model.text_embedding_dim={D}")
        if table is None:
            return
        for i, text in enumerate(probe):       # the same embeddings as training's, or a clear refusal
            want, want_mask = table.lookup(text)
            got, got_mask = pad_rows(emb[i], mask[i], want.shape[0])
            err = np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12)
            if not np.array_equal(got_mask, want_mask) or err > 1e-3:
                raise CheckpointError(f"--text_encoder={self.text_encoder} does not reproduce the text embeddings this "
                                      f"model was trained with (those of {table.encoder}): for {text!r} the relative "
                                      f"difference is {err:.3g}; give the training's encoder")

    def _text(self, prompt: str):
        """The model's text input for `prompt`: byte tokens int32 [1, L], or for a model reading
        precomputed text (float32 [1, L, D], float32 [1, L]) from the run's table or the prompt
        encoder. RequestError for a prompt neither holds (nothing changes)."""
        L = self.cfg.data.text_len
        if self.cfg.model.text_encoder != "precomputed":
            return jnp.asarray(text_tokens(prompt, L))[None]
        if self.text_table is not None and prompt in self.text_table:
            emb, mask = self.text_table.padded(prompt, L)
        elif prompt in self._embedded:
            emb, mask = self._embedded[prompt]
        elif self._encode is not None:
            try:
                e, m = encode_texts(self._encode, [prompt], self.text_encoder)
            except TextEmbeddingError as err:
                raise RequestError(f"the prompt {prompt!r} could not be embedded: {err}") from None
            if len(self._embedded) >= MAX_EMBEDDED_PROMPTS:
                self._embedded.pop(next(iter(self._embedded)))          # the oldest
            emb, mask = self._embedded[prompt] = pad_rows(e[0], m[0], L)
        else:
            known = self.text_table.texts if self.text_table is not None else []
            raise RequestError(f"the prompt {prompt!r} has no precomputed text embedding: this model reads the "
                               f"embeddings of {self.text_table.encoder if self.text_table else 'an external encoder'} "
                               f"and its run holds {len(known)} task texts (e.g. {known[:3]!r}); send one of them, or "
                               f"start the server with --text_encoder=module:function to embed new prompts")
        return jnp.asarray(emb)[None], jnp.asarray(mask)[None]

    def _text_metadata(self) -> dict:
        if self.cfg.model.text_encoder != "precomputed":
            return {"encoder": "bytes"}
        table = self.text_table
        return {"encoder": "precomputed", "text_encoder": table.encoder if table is not None else self.text_encoder,
                "prompts": len(table) if table is not None else 0, "embeds_new_prompts": self._encode is not None}

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str, *, mode: str = "policy", seed: int = 0, data_root: str | None = None,
                        text_encoder: str | None = None) -> ServedModel:
        """Load a workdir, phase folder or export folder with the statistics (and, for a model reading
        precomputed text, the text embeddings) it was trained with (or, for a run that predates them,
        those of `data_root`'s sources); `text_encoder` embeds prompts its table lacks."""
        from data_pipelines.latents import load_latent_stats
        from data_pipelines.normalization import StatsError, load_stats
        from kairos_jax.inference.checkpoints import (
            find_checkpoint,
            load_config,
            load_model,
            load_training_latent_stats,
            load_training_stats,
            load_training_text_embeddings,
        )
        from kairos_jax.inference.rollout import make_engine

        ref = find_checkpoint(path)
        cfg = load_config(ref)
        latent_stats = {}
        try:
            stats = load_training_stats(ref)
            if cfg.data.get("tokenizer", ""):
                latent_stats = load_training_latent_stats(ref)
            if not stats and data_root:
                sources = sorted({s for p in cfg.curriculum for s in cfg.phases[p].mixture})
                stats = {s: load_stats(storage.join(data_root, s)) for s in sources
                         if storage.isdir(storage.join(data_root, s))}
                if cfg.data.get("tokenizer", ""):
                    latent_stats = {s: load_latent_stats(storage.join(data_root, s)) for s in stats}
        except StatsError as e:
            raise CheckpointError(str(e)) from None
        if not stats:
            raise CheckpointError(f"{ref.path}: no training statistics ({storage.dirname(ref.config_path)}/stats/, "
                                  f"written by kairos_jax.train); pass --data_root to use the sources' own")
        embodiments, refused = served_embodiments(cfg, stats)
        text_table = None
        if cfg.model.text_encoder == "precomputed":
            text_table = load_training_text_embeddings(ref)
            if text_table is None and data_root:
                from data_pipelines.text_embeddings import TEXT_INDEX_FILE, TextEmbeddings
                folders = [storage.join(data_root, s) for s in sorted(stats)
                           if storage.isfile(storage.join(data_root, s, TEXT_INDEX_FILE))]
                try:
                    text_table = TextEmbeddings(folders) if folders else None
                except TextEmbeddingError as e:
                    raise CheckpointError(str(e)) from None
        parent = storage.dirname(ref.config_path)
        name = storage.basename(storage.dirname(parent) if storage.basename(parent) == "export" else parent)
        return cls(make_engine(load_model(ref, cfg), cfg), cfg, embodiments, mode=mode, seed=seed, name=name,
                   checkpoint=ref.path, step=ref.step, refused=refused, latent_stats=latent_stats,
                   text_embeddings=text_table, text_encoder=text_encoder)

    def metadata(self, max_message_bytes: int) -> dict:
        return {"model": self.name, "checkpoint": self.checkpoint, "step": self.step, "mode": self.mode,
                "modes": list(MODES), "embodiments": {n: e.describe() for n, e in sorted(self.embodiments.items())},
                "action_horizon": self.k, "action_dim": self.A, "image_size": [self.height, self.width],
                "text_len": self.cfg.data.text_len, "max_message_bytes": int(max_message_bytes), "seed": self.seed,
                "request_keys": list(REQUEST_KEYS[self.mode]), "protocol": PROTOCOL, "text": self._text_metadata(),
                **({"video": {"kind": "latents", "tokenizer": self.tokenizer, "frames_per_request": self.k,
                              "temporal_stride": next(iter(self.codecs.values())).stride}} if self.tokenizer else {})}

    # -- requests ----------------------------------------------------------------------------------

    def handle(self, episode: Episode, request) -> dict:
        """One request of `episode` (updated in place) -> the answer (without timings). RequestError
        for a request that cannot be used, raised before the episode changes."""
        if not isinstance(request, dict):
            raise RequestError(f"a request must be a map of observation keys; got {_describe(request)}")
        bad = [k for k in request if not isinstance(k, str)]
        if bad:
            raise RequestError(f"request keys must be strings; got {bad[:4]!r}")
        if RESET in request:
            if request != {RESET: True}:
                raise RequestError('a reset is the map {"reset": true} alone')
            episode.__dict__.update(Episode().__dict__)
            return {RESET: True}
        allowed = REQUEST_KEYS[self.mode]
        unknown = sorted(set(request) - set(allowed))
        if unknown:
            raise RequestError(f"unknown key(s) {unknown}; a {self.mode} request takes {list(allowed)} "
                               f'(or {{"reset": true}})')
        emb, prompt = self._episode_keys(request, episode)
        text = self._text(prompt) if episode.state is None else None      # the model's text input, checked
        raw_state = self._state(request, emb)
        proprio = None if raw_state is None or emb.proprio_norm is None else emb.proprio_norm.normalize(raw_state)
        if raw_state is None and emb.action_codec.is_delta:
            raise RequestError(f"missing key {STATE!r} (float [{emb.proprio_dim}], raw units): this model's "
                               f"{emb.name} actions are relative to the robot's state, so every request needs it")
        tokens = actions = None
        if self.mode == "policy":
            tokens = self._tokens(self._image(request), episode, emb)
        else:
            actions = self._actions(request, emb)
            if episode.state is None:
                if IMAGE not in request:
                    raise RequestError(f"the first request of a simulate episode needs {IMAGE!r} (uint8 [H, W, 3]): "
                                       f"the frame to start from")
                tokens = self._tokens(self._image(request), episode, emb)
            elif IMAGE in request:
                raise RequestError(f"{IMAGE!r} is only taken by the first request of a simulate episode (the model's "
                                   f'own frames are the history); send {{"reset": true}} to start from a new frame')
        try:
            return self._run(episode, emb, prompt, tokens, actions, proprio, raw_state, text)
        except Exception:
            episode.__dict__.update(Episode().__dict__)      # its state may have been consumed (donated)
            raise

    def _run(self, episode: Episode, emb: ServedEmbodiment, prompt: str, tokens, actions, proprio=None,
             raw_state=None, text=None) -> dict:
        eng = self.engine
        if tokens is not None:                  # (tokens [1, N, Dp], the encoder state after this image)
            tokens, episode.seen = tokens
        # the state observed with this frame: the next chunk's state input (models with proprio_input)
        observed = {} if proprio is None else {"proprio": np.asarray(proprio, np.float32)[None]}
        zeros, ones = np.zeros(1, np.float32), np.ones(1, np.float32)
        dim_mask = np.zeros((1, self.A), np.float32)
        dim_mask[0, :emb.action_dim] = 1.0
        if episode.state is None:
            text = self._text(prompt) if text is None else text
            state = eng.start(text, jnp.asarray([emb.id], jnp.int32), jnp.asarray(dim_mask))
            key, k0 = jax.random.split(jax.random.key(self.seed))
            noise = jax.random.normal(k0, (1, self.k, self.A)) * dim_mask[:, None]
            episode.state = eng.commit(state, tokens, noise, zeros, ones, **observed)   # block 0: a_{-1} absent
            episode.key, episode.embodiment, episode.prompt = key, emb, prompt
            if self.mode == "simulate" and self.tokenizer:     # the decoder starts from the first frame's latent
                episode.decoder = self.codecs[emb.name].decoder()
                episode.decoder(tokens)
        elif self.mode == "policy":
            kh = None
            if eng.policy_history == "absent":           # the chunk's stand-in noise
                episode.key, kh = jax.random.split(episode.key)
            episode.state = eng.commit_policy(episode.state, tokens, episode.chunk, kh, **observed)
        episode.key, kb = jax.random.split(episode.key)
        episode.blocks += 1
        if self.mode == "policy":
            _, chunk, _, _ = eng.denoise(episode.state, kb, mode="policy")
            episode.chunk = chunk
            raw = emb.action_codec.decode(np.asarray(chunk[0, :, :emb.action_dim]), raw_state)   # from this state
            return {ACTIONS: np.ascontiguousarray(raw, np.float32)}
        a = np.zeros((1, self.k, self.A), np.float32)
        a[0, :, :emb.action_dim] = emb.action_codec.encode(actions, raw_state)    # the chunk starts at this state
        episode.state, video, _ = eng.step(episode.state, kb, mode="simulate", actions=a)
        if self.tokenizer:
            frames = episode.decoder(video)[0]                       # [s, H, W, 3]
            return {IMAGE: frames[-1], FRAMES: frames}
        return {IMAGE: self.codecs[emb.name].block_frames(np.asarray(video)[:, None])[0, 0]}

    def _episode_keys(self, request: dict, episode: Episode) -> tuple[ServedEmbodiment, str]:
        name, prompt = request.get(EMBODIMENT), request.get(PROMPT)
        if name is not None and not isinstance(name, str):
            raise RequestError(f"{EMBODIMENT!r} must be a string (one of {sorted(self.embodiments)}); "
                               f"got {_describe(name)}")
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError(f"{PROMPT!r} must be a string; got {_describe(prompt)}")
        if name is not None and name not in self.embodiments:
            why = self.refused.get(name) or ("not registered" if name not in DEFAULT_REGISTRY
                                             else "the model was not trained on it")
            raise RequestError(f"unknown embodiment {name!r} ({why}); this model serves {sorted(self.embodiments)}")
        if episode.state is None:
            missing = [k for k, v in ((PROMPT, prompt), (EMBODIMENT, name)) if v is None]
            if missing:
                raise RequestError(f"missing key(s) {missing}: the first request of an episode needs {PROMPT!r} (str) "
                                   f"and {EMBODIMENT!r} (one of {sorted(self.embodiments)})")
            return self.embodiments[name], str(prompt)
        if name is not None and name != episode.embodiment.name:
            raise RequestError(f"embodiment changed within an episode ({episode.embodiment.name!r} -> {name!r}); "
                               f'send {{"reset": true}} or reconnect to start a new episode')
        if prompt is not None and str(prompt) != episode.prompt:
            raise RequestError(f"prompt changed within an episode ({episode.prompt!r} -> {prompt!r}); "
                               f'send {{"reset": true}} or reconnect to start a new episode')
        return episode.embodiment, episode.prompt

    def _image(self, request: dict) -> np.ndarray:
        """The request's image(s) as uint8 [n, H, W, 3]: n = 1, or k for a tokenizer model's stack."""
        want = "uint8 [H, W, 3]" + (f" or a stack uint8 [{self.k}, H, W, 3]" if self.tokenizer else "")
        if IMAGE not in request:
            raise RequestError(f"missing key {IMAGE!r} ({want})")
        x = request[IMAGE]
        if not isinstance(x, np.ndarray):
            raise RequestError(f"{IMAGE!r} must be a numpy array {want}; got {_describe(x)}")
        if x.dtype != np.uint8:
            raise RequestError(f"{IMAGE!r} has dtype {x.dtype}; expected {want}")
        if self.tokenizer and x.ndim == 4:
            if x.shape[0] != self.k or x.shape[3] != 3 or x.shape[1] < 1 or x.shape[2] < 1:
                raise RequestError(f"{IMAGE!r} has shape {list(x.shape)}; a stack holds the block's k={self.k} "
                                   f"frames: [{self.k}, H, W, 3], oldest first")
            return x
        if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] < 1 or x.shape[1] < 1:
            raise RequestError(f"{IMAGE!r} has shape {list(x.shape)}; expected [H, W, 3] (height, width, RGB), "
                               f"H, W >= 1" + (f", or [{self.k}, H, W, 3]" if self.tokenizer else ""))
        return x[None]

    def _tokens(self, images: np.ndarray, episode: Episode, emb: ServedEmbodiment):
        """uint8 [n, H, W, 3] -> (the block's tokens [1, N, Dp], the encoder state after them); the
        episode is not changed here (`_run` takes the state)."""
        codec = self.codecs[emb.name]
        if episode.state is None or not codec.latent:
            return codec.start(images[-1][None])            # the first frame (a pixel model: the last image)
        if images.shape[0] == 1:
            images = np.repeat(images, self.k, axis=0)       # one image stands for the block's k frames
        return codec.observe(images[None], episode.seen)

    def _float_array(self, request: dict, key: str, shape: tuple, what: str) -> np.ndarray:
        x = request[key]
        if not isinstance(x, np.ndarray):
            raise RequestError(f"{key!r} must be a numpy float array {list(shape)} ({what}); got {_describe(x)}")
        if x.dtype.kind != "f":
            raise RequestError(f"{key!r} has dtype {x.dtype}; expected a float array {list(shape)} ({what})")
        if tuple(x.shape) != shape:
            raise RequestError(f"{key!r} has shape {list(x.shape)}; expected {list(shape)} ({what})")
        if not np.all(np.isfinite(x)):
            raise RequestError(f"{key!r} holds NaN or inf")
        return x.astype(np.float32)

    def _state(self, request: dict, emb: ServedEmbodiment) -> np.ndarray | None:
        """The request's state, checked, in raw units (None without one)."""
        if STATE not in request:
            return None
        if emb.proprio_dim == 0:
            raise RequestError(f"embodiment {emb.name!r} has no proprioception; drop {STATE!r}")
        return self._float_array(request, STATE, (emb.proprio_dim,), f"{emb.name}'s proprio dims, raw units")

    def _actions(self, request: dict, emb: ServedEmbodiment) -> np.ndarray:
        if ACTIONS not in request:
            raise RequestError(f"missing key {ACTIONS!r} (float [{self.k}, {emb.action_dim}], raw units): a simulate "
                               f"request carries the action chunk to apply")
        return self._float_array(request, ACTIONS, (self.k, emb.action_dim),
                                 f"k={self.k} steps of {emb.name}'s {emb.action_dim} action dims, raw units")

    def warm_up(self) -> float:
        """Compile the engine's functions with one throw-away episode; returns the seconds it took."""
        t0 = time.perf_counter()
        emb = min(self.embodiments.values(), key=lambda e: e.id)
        episode = Episode()
        image = np.zeros((self.height, self.width, 3), np.uint8)
        prompt = ""
        if self.cfg.model.text_encoder == "precomputed" and self.text_table is not None:
            prompt = self.text_table.texts[0]            # a stored one: warming up embeds nothing
        for t in range(2):
            req = {EMBODIMENT: emb.name, PROMPT: prompt}
            if self.mode == "policy":
                req[IMAGE] = image
            else:
                req[ACTIONS] = np.zeros((self.k, emb.action_dim), np.float32)
                if t == 0:
                    req[IMAGE] = image
            self.handle(episode, req)
        return time.perf_counter() - t0


# -- the websocket server ----------------------------------------------------------------------------

def _health_check(connection, request):
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


class Server:
    """The websocket server around a ServedModel (see the module docstring for the protocol).

        server = Server(model, host="127.0.0.1", port=0)
        asyncio.run(server.serve(ready=lambda host, port: ...))     # until server.stop()
    """

    def __init__(self, model: ServedModel, *, host: str = "127.0.0.1", port: int = 8000,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, exit_after_idle_s: float = 0.0):
        self.model, self.host, self.port = model, host, int(port)
        self.max_message_bytes = int(max_message_bytes)
        self.exit_after_idle_s = float(exit_after_idle_s)
        self.metadata = model.metadata(self.max_message_bytes)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kairos-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._connections = 0
        self._last_activity = time.monotonic()
        self.requests = 0

    def stop(self) -> None:
        """Ask a running `serve` to return (from any thread)."""
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)

    async def serve(self, ready=None) -> None:
        """Listen until `stop()` (or idle past exit_after_idle_s); calls ready(host, port) once bound.
        OSError when the address cannot be bound."""
        from websockets.asyncio.server import serve

        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        try:
            server = await serve(self._handler, self.host, self.port, compression=None,
                                 max_size=self.max_message_bytes, process_request=_health_check)
        except OSError as e:
            raise BindError(e.errno, f"cannot listen on {self.host}:{self.port} ({e.strerror or e})") from None
        try:
            host, port = server.sockets[0].getsockname()[:2]
            if ready is not None:
                ready(host, port)
            watchdog = asyncio.create_task(self._idle_watchdog()) if self.exit_after_idle_s > 0 else None
            await self._stopped.wait()
            if watchdog is not None:
                watchdog.cancel()
        finally:
            server.close()
            await server.wait_closed()
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def _idle_watchdog(self):
        while True:
            await asyncio.sleep(min(1.0, self.exit_after_idle_s))
            if self._connections == 0 and time.monotonic() - self._last_activity > self.exit_after_idle_s:
                log.warning("no connection for %.0f s: stopping", self.exit_after_idle_s)
                self._stopped.set()
                return

    async def _send(self, ws, data) -> bool:
        from websockets.exceptions import ConnectionClosed

        try:
            await ws.send(data)
            return True
        except ConnectionClosed:
            return False

    async def _handler(self, ws):
        from websockets.exceptions import ConnectionClosed
        from websockets.protocol import State

        self._connections += 1
        peer = ws.remote_address
        log.info("connection from %s opened", peer)
        episode = Episode()
        prev_total_ms = None
        try:
            if not await self._send(ws, wire.packb(self.metadata)):
                return
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosed as e:
                    if e.sent is not None and e.sent.code == 1009:      # over max_message_bytes
                        log.warning("connection from %s closed: %s", peer, e.sent.reason)
                    break
                t_received = time.monotonic()
                self._last_activity = t_received
                try:
                    if isinstance(message, str):
                        raise RequestError("expected a binary msgpack message (openpi's msgpack_numpy); got a text "
                                           "frame")
                    try:
                        request = wire.unpackb(message)
                    except wire.WireError as e:
                        raise RequestError(str(e)) from None

                    def work(request=request, t_received=t_received):
                        if ws.state is not State.OPEN:       # the client left while queued
                            return None, 0.0, 0.0
                        t0 = time.monotonic()
                        answer = self.model.handle(episode, request)
                        return answer, (t0 - t_received) * 1000, (time.monotonic() - t0) * 1000

                    answer, queue_ms, infer_ms = await self._loop.run_in_executor(self._executor, work)
                except RequestError as e:
                    log.info("connection from %s: bad request: %s", peer, e)
                    if not await self._send(ws, f"error: {e}"):
                        break
                    continue
                except Exception as e:  # noqa: BLE001  (a failure inside the model ends the episode, not the server)
                    log.exception("connection from %s: internal error", peer)
                    if not await self._send(ws, f"error: internal error ({type(e).__name__}: {e}); the episode "
                                                f"was reset"):
                        break
                    continue
                if answer is None:
                    break
                if RESET not in answer:
                    timing = {"infer_ms": infer_ms, "queue_ms": queue_ms}
                    if prev_total_ms is not None:
                        timing["prev_total_ms"] = prev_total_ms
                    answer["server_timing"] = timing
                if not await self._send(ws, wire.packb(answer)):
                    log.info("connection from %s: closed before its answer was sent", peer)
                    break
                self.requests += 1
                prev_total_ms = (time.monotonic() - t_received) * 1000
        finally:
            self._connections -= 1
            self._last_activity = time.monotonic()
            log.info("connection from %s closed", peer)

    # -- in-process use (tests, benchmarks) ---------------------------------------------------------

    def start_in_thread(self, timeout: float = 60.0) -> tuple[str, int]:
        """Run `serve` on a daemon thread with its own event loop; returns (host, port) once bound."""
        bound = concurrent.futures.Future()

        def target():
            try:
                asyncio.run(self.serve(ready=lambda h, p: bound.set_result((h, p))))
            except BaseException as e:  # noqa: BLE001
                if not bound.done():
                    bound.set_exception(e)
                raise

        self._thread = threading.Thread(target=target, name="kairos-serve", daemon=True)
        self._thread.start()
        return bound.result(timeout)

    def stop_thread(self, timeout: float = 30.0) -> None:
        self.stop()
        self._thread.join(timeout)
