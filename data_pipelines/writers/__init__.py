"""Exporters of Episodes into the external formats the readers read, so that every reader is
exercised on real files made from our generated episodes (and labs can export to those formats)."""

from data_pipelines.writers.human import write_human
from data_pipelines.writers.lerobot import write_lerobot
from data_pipelines.writers.rlds import write_rlds
from data_pipelines.writers.video_folder import write_video_folder

WRITERS = {"video_folder": write_video_folder, "human": write_human, "rlds": write_rlds,
           "lerobot": write_lerobot}

__all__ = ["WRITERS", "write_human", "write_lerobot", "write_rlds", "write_video_folder"]
