"""LeRobot's side of the interop tests; runs in .venv-lerobot (lerobot + torch), never in .venv.

    .venv-lerobot/bin/python tests/data/lerobot_reference.py write EPISODES.npz DATASET_DIR
        records the episodes with lerobot's own recording API (LeRobotDataset.create, add_frame,
        save_episode, finalize: codec, file layout and metadata all lerobot's defaults, with small
        file-size limits so that some files hold several episodes and there are several files),
        then loads the dataset back with LeRobotDataset and saves what lerobot decodes.
    .venv-lerobot/bin/python tests/data/lerobot_reference.py load DATASET_DIR OUT.npz
        loads a dataset (ours) with LeRobotDataset and saves every item it returns.

EPISODES.npz holds frames_<i> uint8 [T, H, W, 3], actions_<i> [T, A], state_<i> [T, P] and
tasks (a JSON list of strings), fps; OUT.npz holds, per frame of the dataset, in index order:
frames uint8 [N, H, W, 3] (lerobot's float [0, 1] CHW frames * 255, rounded), action, state,
timestamp, episode_index, frame_index, index, plus tasks (JSON) and a JSON `meta` summary. The last
stdout line is that summary.
"""

import json
import sys

import numpy as np


def loaded_libavcodec() -> list:
    """The libavcodec files this process has mapped (which FFmpeg the decoder used)."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if "libavcodec" in line})


def dump(dataset, out_path, camera):
    items = [dataset[i] for i in range(len(dataset))]
    frames = np.stack([np.rint(it[camera].numpy().transpose(1, 2, 0) * 255.0) for it in items]).astype(np.uint8)
    arrays = {name: np.stack([it[name].numpy() for it in items])
              for name in ("action", "observation.state", "timestamp", "episode_index", "frame_index", "index")}
    meta = {"len": len(dataset), "num_episodes": dataset.num_episodes, "fps": dataset.fps,
            "codebase_version": dataset.meta.info["codebase_version"], "video_keys": dataset.meta.video_keys,
            "video_backend": dataset.video_backend, "libavcodec": loaded_libavcodec()}
    np.savez(out_path, frames=frames, action=arrays["action"], state=arrays["observation.state"],
             timestamp=arrays["timestamp"], episode_index=arrays["episode_index"],
             frame_index=arrays["frame_index"], index=arrays["index"],
             tasks=json.dumps([it["task"] for it in items]), meta=json.dumps(meta))
    return meta


def write(episodes_path, root):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    z = np.load(episodes_path)
    tasks = json.loads(str(z["tasks"]))
    n = len(tasks)
    first = z["frames_0"]
    features = {
        "observation.images.top": {"dtype": "video", "shape": tuple(first.shape[1:]),
                                   "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (z["state_0"].shape[1],), "names": None},
        "action": {"dtype": "float32", "shape": (z["actions_0"].shape[1],), "names": None},
    }
    dataset = LeRobotDataset.create(repo_id="kairos/interop", fps=int(z["fps"]), features=features, root=root,
                                    robot_type="reacher", use_videos=True)
    # Small files: a data / video file takes episodes until it passes these sizes, so the dataset
    # has several files, some of them holding several episodes (a 24-step episode of the reacher's
    # 8-dim state and 2-dim action is ~5.3 KB of parquet).
    dataset.meta.update_chunk_settings(data_files_size_in_mb=0.006, video_files_size_in_mb=0.012)
    for i in range(n):
        for t in range(len(z[f"frames_{i}"])):
            dataset.add_frame({"observation.images.top": z[f"frames_{i}"][t], "observation.state": z[f"state_{i}"][t],
                               "action": z[f"actions_{i}"][t], "task": tasks[i]})
        dataset.save_episode()
    dataset.finalize()
    loaded = LeRobotDataset("kairos/interop", root=root)
    meta = dump(loaded, f"{root}.lerobot.npz", "observation.images.top")
    meta["video_codec"] = loaded.meta.info["features"]["observation.images.top"]["info"]["video.codec"]
    return meta


def load(root, out_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("kairos/ours", root=root)
    return dump(dataset, out_path, dataset.meta.video_keys[0])


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = {"write": write, "load": load}[command](*args)
    print(json.dumps(result), flush=True)
