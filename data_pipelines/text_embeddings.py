"""Precomputed text embeddings: every distinct task text of a source encoded once by an external text
or vision-language model (a T5, a VLM the user has locally), stored beside the source's shards and
looked up by an episode's text when a clip is made (the model's `text_encoder = "precomputed"`,
kairos_jax/model/text.py).

The encoder is a user function named `module:function` (`--text_encoder=` of `python -m
data_pipelines.convert`, `python -m data_pipelines.text_embed`, `python -m kairos_jax.serve`). It maps a
list of N strings to

    (embeddings float [N, L, D], mask [N, L])   one row per token of the external model (mask 1 on real
                                                tokens, 0 on padding), or
    embeddings float [N, D]                     one vector per text (taken as L = 1, mask 1)

and is called once per batch of distinct texts (`encode_texts`), never per episode.

Files beside the shards (no pickle anywhere):

    text_embeddings.json       {"version": 1, "encoder": "module:function", "dim": D, "length": L,
                                "count": N, "embeddings": "text_embeddings.npy",
                                "mask": "text_embedding_mask.npy", "rows": {text: row}}
    text_embeddings.npy        float32 [N, L, D]   row i: the text whose "rows" entry is i, zero-padded
    text_embedding_mask.npy    uint8   [N, L]      to L = the longest of the encoder's outputs
    manifest.json              "text_embeddings": {"encoder", "dim", "length", "count",
                                                   "index": "text_embeddings.json"}

The arrays are opened with `np.load(..., mmap_mode="r", allow_pickle=False)` (remote files are read
whole, without pickle too), so a local table of many texts is paged in as clips read it. A training run
keeps copies of the tables of its sources in `<workdir>/stats/<source>/` (beside its statistics), and
rollout, evaluation and serving look texts up there, so they need neither the training data nor the
encoder.

A clip carries `text_embedding` float32 [text_len, D] and `text_embedding_mask` float32 [text_len]:
the stored rows truncated to the first `data.text_len` tokens, or zero-padded (mask 0) to it
(`TextEmbeddings.padded`).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from data_pipelines import storage
from data_pipelines.episode import EpisodeError

log = logging.getLogger(__name__)

TEXT_INDEX_FILE = "text_embeddings.json"
TEXT_EMBEDDINGS_FILE = "text_embeddings.npy"
TEXT_MASK_FILE = "text_embedding_mask.npy"
TEXT_FILES = (TEXT_INDEX_FILE, TEXT_EMBEDDINGS_FILE, TEXT_MASK_FILE)
TEXT_VERSION = 1
DEFAULT_TEXT_BATCH = 64


class TextEmbeddingError(ValueError):
    """A text encoder or a stored table that cannot be used; the message names the encoder or file."""


class MissingTextEmbedding(EpisodeError):
    """A task text that the table holds no embedding for (an EpisodeError: the training pipeline skips
    and counts such a clip, or stops on it with data.strict)."""


# ----------------------------------------------------------------------------------------------
# The user's encoder.


def load_text_encoder(spec: str) -> Callable:
    """'package.module:function' -> the function (ValueError / ImportError naming the flag)."""
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--text_encoder={spec!r}: expected module:function (a function mapping a list of N "
                         f"strings to (float [N, L, D], mask [N, L]) or float [N, D])")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--text_encoder={spec!r}: {module} has no function {name}")
    return fn


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__


def encode_texts(fn: Callable, texts: Sequence[str], spec: str) -> tuple[np.ndarray, np.ndarray]:
    """fn(list of N texts) -> (float32 [N, L, D], uint8 [N, L]) checked: a tuple (embeddings, mask) or one
    float [N, D] array (L = 1). TextEmbeddingError naming the encoder and what it returned."""
    texts = list(texts)
    N = len(texts)
    out = fn(texts)
    want = f"(float [{N}, L, D], mask [{N}, L]) or float [{N}, D]"
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TextEmbeddingError(f"--text_encoder={spec} returned a tuple of {len(out)} for {N} texts; "
                                     f"expected {want}")
        emb, mask = np.asarray(out[0]), np.asarray(out[1])
    else:
        emb, mask = np.asarray(out), None
        if emb.ndim == 2:
            emb = emb[:, None]
            mask = np.ones(emb.shape[:2], np.uint8)
    if mask is None or emb.ndim != 3 or emb.shape[0] != N or emb.shape[1] < 1 or emb.shape[2] < 1 \
            or not np.issubdtype(emb.dtype, np.floating) or mask.shape != emb.shape[:2] \
            or not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool):
        got = _describe(emb) if mask is None or not isinstance(out, tuple) else f"({_describe(emb)}, {_describe(mask)})"
        raise TextEmbeddingError(f"--text_encoder={spec} returned {got} for {N} texts; expected {want}")
    bad = ~np.isfinite(emb).all(axis=(1, 2))
    if bad.any():
        raise TextEmbeddingError(f"--text_encoder={spec} returned NaN or inf for the text "
                                 f"{texts[int(np.flatnonzero(bad)[0])]!r}")
    return emb.astype(np.float32), (mask > 0).astype(np.uint8)


def _batch_path(work_dir: str, index: int) -> str:
    return storage.join(work_dir, f"text-{index:05d}.npz")


def _load_batch(path: str, texts: list[str], spec: str):
    """A finished batch of an earlier run (same texts, same encoder), or None."""
    if not storage.exists(path):
        return None
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            if str(z["encoder"]) != spec or z["texts"].tolist() != texts:
                return None
            return z["embeddings"], z["mask"]
    except (OSError, ValueError, KeyError):
        return None


def embed_texts(texts: Sequence[str], spec: str, *, batch_size: int = DEFAULT_TEXT_BATCH,
                work_dir: str | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every text of `texts` (distinct) through the encoder `spec`, `batch_size` texts per call ->
    (float32 [N, L, D], uint8 [N, L]) in the order of `texts`, zero-padded to the longest L.

    With `work_dir`, each batch's result is kept there (text-NNNNN.npz with its texts and the encoder
    spec) and reused by a later call with the same texts and encoder: a stopped run resumes. The
    encoder is imported only when a batch has to be computed."""
    texts = list(texts)
    if len(set(texts)) != len(texts):
        raise ValueError("embed_texts: the texts must be distinct")
    if int(batch_size) < 1:
        raise ValueError(f"--text_batch={batch_size} must be >= 1")
    fn = None
    parts = []
    if work_dir:
        storage.makedirs(work_dir)
    starts = range(0, len(texts), int(batch_size))
    for i, lo in enumerate(starts):
        chunk = texts[lo:lo + int(batch_size)]
        path = _batch_path(work_dir, i) if work_dir else None
        got = _load_batch(path, chunk, spec) if path else None
        if got is None:
            fn = fn or load_text_encoder(spec)
            got = encode_texts(fn, chunk, spec)
            if path:
                buf = io.BytesIO()
                np.savez(buf, texts=np.asarray(chunk, dtype=str), encoder=np.asarray(spec), embeddings=got[0],
                         mask=got[1])
                storage.write_bytes_atomic(path, buf.getvalue())
        if parts and got[0].shape[2] != parts[0][0].shape[2]:
            raise TextEmbeddingError(f"--text_encoder={spec} returned {got[0].shape[2]} features for some texts and "
                                     f"{parts[0][0].shape[2]} for others; every text needs the same D")
        parts.append(got)
        if progress:
            log.info("text embeddings: %d / %d texts", min(lo + int(batch_size), len(texts)), len(texts))
    if not parts:
        raise ValueError("embed_texts: no texts")
    L = max(e.shape[1] for e, _ in parts)
    emb = np.concatenate([np.pad(e, ((0, 0), (0, L - e.shape[1]), (0, 0))) for e, _ in parts])
    mask = np.concatenate([np.pad(m, ((0, 0), (0, L - m.shape[1]))) for _, m in parts])
    return emb, mask


def clear_batches(work_dir: str) -> None:
    """Removes the per-batch files `embed_texts` kept in `work_dir`."""
    if storage.isdir(work_dir):
        for name in storage.listdir(work_dir):
            if name.startswith("text-") and name.endswith(".npz"):
                storage.remove(storage.join(work_dir, name))


# ----------------------------------------------------------------------------------------------
# The stored table.


@dataclasses.dataclass(frozen=True)
class TextEmbeddingInfo:
    """A source's text embeddings as its manifest records them ("text_embeddings")."""

    encoder: str                 # the module:function that computed them
    dim: int                     # D
    length: int                  # L: rows per text (the longest of the encoder's outputs)
    count: int                   # N: distinct texts
    index: str = TEXT_INDEX_FILE

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "manifest") -> TextEmbeddingInfo:
        try:
            return cls(encoder=str(d["encoder"]), dim=int(d["dim"]), length=int(d["length"]), count=int(d["count"]),
                       index=str(d.get("index", TEXT_INDEX_FILE)))
        except (KeyError, TypeError, ValueError) as e:
            raise TextEmbeddingError(f"{where}: damaged \"text_embeddings\" record ({type(e).__name__}: {e})") from None


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def write_text_embeddings(directory: str, texts: Sequence[str], embeddings: np.ndarray, mask: np.ndarray,
                          encoder: str) -> TextEmbeddingInfo:
    """Writes the table of `texts` (distinct; row i = texts[i]) into `directory`: the two arrays, then the
    index (module docstring). Returns the manifest record."""
    texts = list(texts)
    embeddings = np.asarray(embeddings, np.float32)
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    N, L, D = embeddings.shape
    if len(texts) != N or mask.shape != (N, L) or len(set(texts)) != N:
        raise ValueError(f"write_text_embeddings: {len(texts)} distinct texts, embeddings {list(embeddings.shape)}, "
                         f"mask {list(mask.shape)}")
    storage.write_bytes_atomic(storage.join(directory, TEXT_EMBEDDINGS_FILE), _npy_bytes(embeddings))
    storage.write_bytes_atomic(storage.join(directory, TEXT_MASK_FILE), _npy_bytes(mask))
    index = {"version": TEXT_VERSION, "encoder": encoder, "dim": D, "length": L, "count": N,
             "embeddings": TEXT_EMBEDDINGS_FILE, "mask": TEXT_MASK_FILE, "rows": {t: i for i, t in enumerate(texts)}}
    storage.write_json_atomic(storage.join(directory, TEXT_INDEX_FILE), index)     # last: the table is complete
    return TextEmbeddingInfo(encoder=encoder, dim=D, length=L, count=N)


def read_text_index(directory: str, name: str = TEXT_INDEX_FILE) -> dict | None:
    """DIR/text_embeddings.json (checked), or None when the folder has none."""
    path = storage.join(directory, name)
    try:
        doc = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TextEmbeddingError(f"{path}: unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != TEXT_VERSION:
        raise TextEmbeddingError(f"{path}: text embeddings version "
                                 f"{doc.get('version') if isinstance(doc, dict) else None} is not {TEXT_VERSION}")
    try:
        rows = {str(t): int(i) for t, i in doc["rows"].items()}
        dim, length, count = int(doc["dim"]), int(doc["length"]), int(doc["count"])
        str(doc["encoder"]), str(doc["embeddings"]), str(doc["mask"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TextEmbeddingError(f"{path}: damaged index ({type(e).__name__}: {e})") from None
    if sorted(rows.values()) != list(range(count)) or min(dim, length) < 1:
        raise TextEmbeddingError(f"{path}: damaged index (rows of {len(rows)} texts for count={count}, dim={dim}, "
                                 f"length={length})")
    doc["rows"] = rows
    return doc


def copy_text_embeddings(source_dir: str, target_dir: str, index: str = TEXT_INDEX_FILE) -> None:
    """Copies a table (its two arrays, then its index) from one folder to another (local or URLs)."""
    doc = read_text_index(source_dir, index)
    if doc is None:
        raise TextEmbeddingError(f"{storage.join(source_dir, index)}: missing")
    storage.makedirs(target_dir)
    for name, target in ((doc["embeddings"], doc["embeddings"]), (doc["mask"], doc["mask"]),
                         (index, TEXT_INDEX_FILE)):          # the index last: the copy is complete
        src, dst = storage.join(source_dir, name), storage.join(target_dir, target)
        if storage.is_remote(src) or storage.is_remote(dst):
            storage.write_bytes_atomic(dst, storage.read_bytes(src))
        else:
            tmp = f"{storage.abspath(dst)}.tmp{os.getpid()}"
            shutil.copyfile(storage.abspath(src), tmp)
            os.replace(tmp, storage.abspath(dst))


class TextEmbeddings:
    """Text -> stored embedding rows, over the tables of one or more folders (a source's; or a run's
    copies of its sources' tables, searched in the order given). Every table must come from the same
    encoder with the same D. Picklable: the arrays are reopened lazily (memory-mapped) in each process.

        table = TextEmbeddings([dir_a, dir_b])
        emb, mask = table.padded("push the puck", 16)    # float32 [16, D], float32 [16]
    """

    def __init__(self, directories: str | Sequence[str]):
        directories = [directories] if isinstance(directories, str) else list(directories)
        self.parts: list[tuple[str, dict]] = []
        for d in directories:
            doc = read_text_index(d)
            if doc is None:
                raise TextEmbeddingError(f"{storage.join(d, TEXT_INDEX_FILE)}: missing (no text embeddings: embed the "
                                         f"source's texts with `python -m data_pipelines.text_embed --input={d} "
                                         f"--text_encoder=module:function`)")
            self.parts.append((d, doc))
        if not self.parts:
            raise TextEmbeddingError("TextEmbeddings: no folder given")
        first = self.parts[0][1]
        for d, doc in self.parts[1:]:
            if doc["encoder"] != first["encoder"] or doc["dim"] != first["dim"]:
                raise TextEmbeddingError(f"{d}: text embeddings of {doc['encoder']} (D={doc['dim']}), but "
                                         f"{self.parts[0][0]} has those of {first['encoder']} (D={first['dim']}): "
                                         f"one model reads the embeddings of one encoder")
        self.encoder: str = first["encoder"]
        self.dim: int = int(first["dim"])
        self.length: int = max(int(doc["length"]) for _, doc in self.parts)
        self._where: dict[str, tuple[int, int]] = {}
        for p, (_, doc) in enumerate(self.parts):
            for text, row in doc["rows"].items():
                self._where.setdefault(text, (p, row))
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}          # reopened (memory-mapped) in each process
        return state

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, text) -> bool:
        return text in self._where

    @property
    def texts(self) -> list[str]:
        """The distinct texts the tables hold, sorted."""
        return sorted(self._where)

    @property
    def directories(self) -> list[str]:
        return [d for d, _ in self.parts]

    def _load(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._arrays.get(p)
        if got is None:
            d, doc = self.parts[p]
            arrays = []
            for name in (doc["embeddings"], doc["mask"]):
                path = storage.join(d, name)
                try:
                    if storage.is_remote(path):     # read whole (a staged copy could be stale)
                        arrays.append(np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False))
                    else:
                        arrays.append(np.load(storage.abspath(path), mmap_mode="r", allow_pickle=False))
                except FileNotFoundError:
                    raise TextEmbeddingError(f"{path}: missing (listed in {d}/{TEXT_INDEX_FILE})") from None
                except (OSError, ValueError) as e:
                    raise TextEmbeddingError(f"{path}: unreadable: {e}") from None
            emb, mask = arrays
            N, L, D = doc["count"], doc["length"], doc["dim"]
            if emb.shape != (N, L, D) or mask.shape != (N, L) or emb.dtype != np.float32:
                raise TextEmbeddingError(f"{d}: text embeddings are {emb.dtype}{list(emb.shape)} with a mask "
                                         f"{list(mask.shape)}; its index says float32 [{N}, {L}, {D}]")
            got = self._arrays[p] = (emb, mask)
        return got

    def lookup(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored rows of `text`: (float32 [L_t, D], float32 [L_t]), L_t its table's length.
        MissingTextEmbedding when no table holds it."""
        where = self._where.get(text)
        if where is None:
            example = ", ".join(repr(t) for t in self.texts[:3])
            raise MissingTextEmbedding(
                f"task text {text!r} has no stored embedding (the tables in {', '.join(self.directories)} hold "
                f"{len(self)} texts of {self.encoder}, e.g. {example}); embed it with `python -m "
                f"data_pipelines.text_embed --input=<its source folder> --text_encoder={self.encoder}`")
        p, row = where
        emb, mask = self._load(p)
        return np.asarray(emb[row], np.float32), np.asarray(mask[row], np.float32)

    def padded(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        """`lookup(text)` at a fixed number of rows: the first `length` (truncated) or zero-padded to it
        (mask 0): (float32 [length, D], float32 [length])."""
        emb, mask = self.lookup(text)
        return pad_rows(emb, mask, length)


def pad_rows(emb: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(float [L, D], [L]) -> (float32 [length, D], float32 [length]): truncated to the first `length`
    rows or zero-padded (mask 0)."""
    L, D = emb.shape
    out = np.zeros((length, D), np.float32)
    out_mask = np.zeros((length,), np.float32)
    n = min(L, length)
    out[:n] = emb[:n]
    out_mask[:n] = np.asarray(mask[:n], np.float32) > 0
    return out, out_mask


def embed_source_texts(directory: str, texts: Sequence[str], spec: str, *, batch_size: int = DEFAULT_TEXT_BATCH,
                       work_dir: str | None = None, progress: bool = False) -> TextEmbeddingInfo:
    """The table of `texts` (any order, repeats allowed) by encoder `spec` in `directory`: the one already
    there when it holds exactly these texts from this encoder, else computed (resumable through
    `work_dir`, whose batch files are removed once the table is written). Returns the manifest record."""
    distinct = sorted(set(texts))
    doc = read_text_index(directory)
    if doc is not None and doc["encoder"] == spec and set(doc["rows"]) == set(distinct):
        return TextEmbeddingInfo(encoder=spec, dim=int(doc["dim"]), length=int(doc["length"]), count=int(doc["count"]))
    emb, mask = embed_texts(distinct, spec, batch_size=batch_size, work_dir=work_dir, progress=progress)
    info = write_text_embeddings(directory, distinct, emb, mask, spec)
    if work_dir:
        clear_batches(work_dir)
    return info
