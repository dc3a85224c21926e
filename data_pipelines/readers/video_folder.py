"""Open-world video: a folder of video files with an optional captions file.

Layout:

    <root>/**/<name>.{mp4,webm,mkv,mov}    any depth, any codec FFmpeg decodes
    <root>/captions.jsonl                    optional, one {"path": "<rel path>", "caption": "..."} a line
    <root>/captions.csv                      or a CSV with a header row and columns path, caption

`path` is relative to <root>. A video without a caption gets the empty text; a caption whose
video is missing is reported as bad input (the file was listed but is not there). Each file is
one action-free episode of embodiment `passive_camera`, decoded with PyAV, optionally resampled
to `target_fps` and resized / center-cropped to `size` (see data_pipelines.video).

<root> may be a URL (gs://, s3://, memory://, ...): the folder is listed and every file read through
data_pipelines.storage (videos are demuxed from a file object, nothing is staged). A folder with
neither videos nor captions is an error (BadInputError), not a source of 0 episodes.
"""

from __future__ import annotations

import csv
import io
import json
import os

from data_pipelines import storage
from data_pipelines.episode import Episode
from data_pipelines.readers.base import BadInputError, EpisodeReader
from data_pipelines.video import VIDEO_SUFFIXES, decode

CAPTION_FILES = ("captions.jsonl", "captions.csv")


def read_captions(path) -> dict[str, str]:
    """path (JSONL or CSV, by suffix; local or a URL) -> {relative video path: caption}. Raises
    BadInputError."""
    path = os.fspath(path)
    captions: dict[str, str] = {}
    if not storage.isfile(path):
        raise BadInputError(path, "captions file is missing")
    try:
        with storage.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                missing = {"path", "caption"} - set(reader.fieldnames or ())
                if missing:
                    raise BadInputError(path, f"CSV header {reader.fieldnames} lacks {sorted(missing)}")
                rows = ((reader.line_num, row) for row in reader)
            else:
                rows = ((n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip())
            for line, row in rows:
                if not isinstance(row, dict) or not isinstance(row.get("path"), str) \
                        or not isinstance(row.get("caption"), str):
                    raise BadInputError(path, f"line {line} is not a {{path, caption}} record of strings")
                captions[os.path.normpath(row["path"])] = row["caption"]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(path, f"unreadable captions file: {e}") from e
    return captions


class VideoFolderReader(EpisodeReader):
    format = "video_folder"

    def __init__(self, root, *, captions=None, target_fps: float | None = None,
                 size: tuple[int, int] | None = None, embodiment: str | None = None, registry=None):
        """captions: a captions file (default: captions.jsonl / captions.csv in root, if present)."""
        super().__init__(root, embodiment=embodiment, registry=registry)
        self.target_fps = target_fps
        self.size = size
        files = storage.walk_files(self.root)   # one listing, local or remote
        if captions is None:
            found = [storage.join(self.root, c) for c in CAPTION_FILES if c in files]
            if len(found) > 1:
                raise BadInputError(self.root, f"two captions files {found}; pass captions= to pick one")
            captions = found[0] if found else None
        self.captions = read_captions(captions) if captions is not None else {}
        self._videos = {f for f in files if f.lower().endswith(VIDEO_SUFFIXES)}
        self._keys = sorted(self._videos | set(self.captions))
        if not self._keys:
            raise BadInputError(self.root, f"no episodes: no video files ({', '.join(VIDEO_SUFFIXES)}) at any "
                                           f"depth and no captions")

    def keys(self):
        return self._keys

    def file_of(self, key):
        return storage.join(self.root, key)

    def load(self, key):
        path = self.file_of(key)
        if key not in self._videos and not storage.exists(path):
            raise BadInputError(path, "listed in the captions file but missing")
        video = decode(path, target_fps=self.target_fps, size=self.size)
        return Episode(frames=video.frames, actions=None, proprio=None, text=self.captions.get(key, ""),
                       embodiment=self.embodiment or "passive_camera", fps=video.fps,
                       source=storage.basename(self.root), episode_id=os.path.splitext(key)[0])
