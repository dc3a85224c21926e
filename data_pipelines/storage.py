"""One file layer for local paths and remote URLs (gs://, s3://, memory://, ...), through fsspec.

Every reader, the converter's output, the training pipeline's shard reading and the files a training
run writes in its workdir (kairos_jax.training; Orbax writes the checkpoints themselves) go through
these functions, so a path may be a local path or any URL fsspec knows (gs:// needs `gcsfs`, s3:// needs
`s3fs`: `pip install kairos-jax[remote]`; memory:// is built in and is what the tests use).

Libraries that only take local files get one of two treatments:

- ArrayRecord (our shards, TFDS array_record builders). Its reader is C++ (riegeli) with its own
  file layer: local files and, in the array_record wheels we use (0.8.x), gs:// objects through
  riegeli's GCS reader; no s3:// and no fsspec. `readable_path` hands it local paths and gs://
  URLs as they are (`NATIVE_SCHEMES`) and stages any other URL into a local cache
  (`stage`: downloaded once, checked by size, renamed into place atomically, so concurrent
  processes never see a partial file). The ArrayRecord writer gets a local staging file that is
  uploaded when finished (`staged_output`).
- PyAV reads a file object (`open`), so videos are read remotely without staging; pyarrow reads
  parquet from a file object too.

Local paths stay plain `str` paths (never `file://` URLs) so messages name files as users wrote them.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile

import fsspec

_builtin_open = builtins.open   # this module defines its own `open`

# Schemes whose URLs ArrayRecord's own reader opens (riegeli::GcsReader is compiled into array_record).
NATIVE_SCHEMES = ("gs",)
CACHE_ENV = "KAIROS_DATA_CACHE"


def scheme(path) -> str:
    """'' for a local path (or file://), else the URL scheme ('gs', 's3', 'memory', ...)."""
    path = os.fspath(path)
    if "://" not in path:
        return ""
    s = path.split("://", 1)[0].lower()
    return "" if s in ("file", "local") else s


def is_remote(path) -> bool:
    return scheme(path) != ""


def _local(path) -> str:
    path = os.fspath(path)
    return path.split("://", 1)[1] if path.startswith(("file://", "local://")) else path


def _fs(path):
    """(filesystem, path in that filesystem's terms)."""
    if not is_remote(path):
        return fsspec.filesystem("file"), os.path.abspath(_local(path))
    try:
        # No listing cache: other writers (Orbax's own client, other processes and hosts) add files to
        # the same folders, and a cached listing would not show them (a new checkpoint step, a shard).
        return fsspec.core.url_to_fs(os.fspath(path), use_listings_cache=False)
    except ImportError as e:
        raise ImportError(f"{path}: reading {scheme(path)}:// URLs needs an fsspec backend ({e}); "
                          f"`pip install kairos-jax[remote]` installs gcsfs and s3fs") from e


def forget_cached_listings(path) -> None:
    """Drops what this process's file systems of `path`'s scheme have cached about `path` and below.
    This module caches no listing, but other clients in the process do (etils epath, which Orbax
    writes checkpoints through, uses fsspec's default listing cache): after another process changed
    a folder, call this before such a client looks at it again. Nothing to do for a local path."""
    if not is_remote(path):
        return
    fs, p = _fs(path)
    for instance in list(type(fs)._cache.values()):     # fsspec keeps one instance per set of options
        instance.invalidate_cache(p)


def join(base, *parts) -> str:
    base = os.fspath(base)
    if is_remote(base):
        return posixpath.join(base, *[os.fspath(p) for p in parts])
    return os.path.join(base, *parts)


def basename(path) -> str:
    path = os.fspath(path).rstrip("/")
    return posixpath.basename(path) if is_remote(path) else os.path.basename(os.path.normpath(path))


def dirname(path) -> str:
    path = os.fspath(path).rstrip("/")
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def relpath(path, start) -> str:
    if is_remote(start):
        return posixpath.relpath(_fs(path)[1], _fs(start)[1])
    return os.path.relpath(path, start)


def abspath(path) -> str:
    """Local paths made absolute; URLs as they are (without a trailing slash)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(_local(path))


def exists(path) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path) -> bool:
    if not is_remote(path):
        return os.path.isdir(_local(path))
    fs, p = _fs(path)
    return fs.isdir(p)


def isfile(path) -> bool:
    if not is_remote(path):
        return os.path.isfile(_local(path))
    fs, p = _fs(path)
    return fs.isfile(p)


def size(path) -> int:
    if not is_remote(path):
        return os.path.getsize(_local(path))
    fs, p = _fs(path)
    return int(fs.size(p))


def listdir(path) -> list[str]:
    """Names (not paths) of the entries of a folder, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(_local(path)))
    fs, p = _fs(path)
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False) if e.rstrip("/") != p.rstrip("/"))


def glob(pattern) -> list[str]:
    """Paths (URLs for a remote pattern) matching a glob pattern, sorted."""
    if not is_remote(pattern):
        import glob as glob_lib
        return sorted(glob_lib.glob(_local(pattern)))
    pattern = os.fspath(pattern)
    cut = min([i for i, c in enumerate(pattern) if c in "*?["] or [len(pattern)])
    base = pattern[:pattern.rfind("/", 0, cut)]          # the literal folder the pattern starts in
    fs, p = _fs(pattern)
    fs_base = _fs(base)[1].rstrip("/")
    # Matches as URLs written like the pattern (memory://a/b, not memory:///a/b).
    return sorted(base + m[len(fs_base):] for m in fs.glob(p) if m.startswith(fs_base))


def walk_files(root) -> list[str]:
    """Every file below `root` (any depth), as paths relative to root, sorted."""
    if not is_remote(root):
        out = []
        for dirpath, _, names in os.walk(_local(root)):
            out.extend(os.path.relpath(os.path.join(dirpath, n), _local(root)) for n in names)
        return sorted(out)
    fs, p = _fs(root)
    return sorted(posixpath.relpath(f, p) for f in fs.find(p))


def open(path, mode: str = "rb", **kwargs):  # noqa: A001 - the module's own `open`
    if not is_remote(path):
        return _builtin_open(_local(path), mode, **kwargs)
    fs, p = _fs(path)
    return fs.open(p, mode, **kwargs)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def makedirs(path) -> None:
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=True)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def remove(path) -> None:
    if not is_remote(path):
        os.remove(_local(path))
        return
    fs, p = _fs(path)
    fs.rm(p)


def write_bytes_atomic(path, data: bytes) -> None:
    """Local: write a temporary file beside `path` and rename it over (atomic). Remote object stores
    make an object visible only once its upload completes, which is atomic too."""
    if not is_remote(path):
        tmp = f"{_local(path)}.tmp{os.getpid()}"
        with _builtin_open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, _local(path))
        return
    with open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path, obj, **kwargs) -> None:
    write_bytes_atomic(path, json.dumps(obj, **kwargs).encode("utf-8"))


def upload(local_path: str, path) -> None:
    """Copies a finished local file to `path` (a rename when `path` is local)."""
    if not is_remote(path):
        os.replace(local_path, _local(path))
        return
    fs, p = _fs(path)
    fs.put_file(local_path, p)


def upload_folder(local_dir: str, path) -> list[str]:
    """Copies every file directly in `local_dir` to the folder `path` (created), under the same
    names, in name order; returns the destinations."""
    makedirs(path)
    out = []
    for name in sorted(os.listdir(local_dir)):
        upload(os.path.join(local_dir, name), join(path, name))
        out.append(join(path, name))
    return out


def cache_dir(override: str | None = None) -> str:
    """Where remote files are staged: `override`, else $KAIROS_DATA_CACHE, else ~/.cache/kairos_jax."""
    d = override or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kairos_jax")
    os.makedirs(d, exist_ok=True)
    return d


def stage(path, cache: str | None = None) -> str:
    """A local copy of a remote file (the path itself when local), kept in the cache.

    Named by a hash of the URL plus its base name; reused when its size matches the remote
    object's; written under a unique temporary name and renamed, so concurrent stagers are safe.
    """
    if not is_remote(path):
        return _local(path)
    path = os.fspath(path)
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]
    local = os.path.join(cache_dir(cache), "staged", f"{digest}-{basename(path)}")
    want = size(path)
    if os.path.exists(local) and os.path.getsize(local) == want:
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".staging-")
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as f:
            shutil.copyfileobj(f, out, length=8 << 20)
        if os.path.getsize(tmp) != want:
            raise OSError(f"{path}: staged {os.path.getsize(tmp)} bytes of {want}")
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local


def readable_path(path, cache: str | None = None) -> str:
    """A path ArrayRecord's reader can open: local paths and gs:// URLs as they are (its native
    file layer), any other URL staged locally (`stage`)."""
    if scheme(path) == "":
        return _local(path)
    return os.fspath(path) if scheme(path) in NATIVE_SCHEMES else stage(path, cache)


@contextlib.contextmanager
def staged_output(path):
    """Yields a local path to write `path` to; on success the file is moved there (uploaded when
    remote). On an exception the local file is removed and nothing is written to `path`."""
    if not is_remote(path):
        local = _local(path) + ".partial"
        try:
            yield local
            os.replace(local, _local(path))
        finally:
            if os.path.exists(local):
                os.remove(local)
        return
    fd, local = tempfile.mkstemp(prefix="kairos-upload-", suffix="-" + basename(path))
    os.close(fd)
    try:
        yield local
        upload(local, path)
    finally:
        if os.path.exists(local):
            os.remove(local)
