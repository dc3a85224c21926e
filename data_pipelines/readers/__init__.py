"""Readers of external formats, one module each; every reader yields validated Episodes. Every
reader takes a local path or a URL (gs://, s3://, memory://; data_pipelines/storage.py).

    video_folder   a folder of mp4/webm (+ captions.jsonl / captions.csv)      readers/video_folder.py
    human          video + keypoints (.npz / .parquet) + tasks.jsonl           readers/human.py
    rlds           RLDS through a TFDS builder directory (Open X-Embodiment     readers/rlds.py
                   datasets as published with spec=, data_pipelines/oxe.py)
    lerobot        LeRobot v2.0 / v2.1 / v3.0 (version from meta/info.json)    readers/lerobot.py
    shards         our ArrayRecord shards + manifest.json (data_pipelines.shards) readers/shards.py
"""

from data_pipelines.readers.base import BadInputError, EpisodeReader, Skipped, check_embodiment
from data_pipelines.readers.human import HumanReader
from data_pipelines.readers.lerobot import LeRobotReader
from data_pipelines.readers.rlds import RldsReader
from data_pipelines.readers.shards import ShardReader
from data_pipelines.readers.video_folder import VideoFolderReader

READERS: dict[str, type[EpisodeReader]] = {
    "video_folder": VideoFolderReader,
    "human": HumanReader,
    "rlds": RldsReader,
    "lerobot": LeRobotReader,
    "shards": ShardReader,
}

__all__ = ["READERS", "BadInputError", "EpisodeReader", "HumanReader", "LeRobotReader", "RldsReader",
           "ShardReader", "Skipped", "VideoFolderReader", "check_embodiment"]
