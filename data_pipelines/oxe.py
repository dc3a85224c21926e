"""Open X-Embodiment datasets as published: how each one's RLDS steps map to an Episode.

Every OXE dataset is an RLDS TFDS dataset with its own feature dictionary (the TFDS catalog entry
of the dataset, e.g. tensorflow.org/datasets/catalog/fractal20220817_data, and the OXE dataset
spreadsheet for the control frequency). An `OxeSpec` names, in that dictionary:

    cameras      image features under steps/observation; the first is read unless the reader is
                 given another (`camera=`)
    state        features under steps/observation concatenated (in this order) into proprio
    action       the action: `action_path` (usually "action") is a Tensor, or a FeaturesDict whose
                 `action_keys` are concatenated in this order (the others, e.g. terminate_episode,
                 are left out); scalar features count as one dimension
    language     where the instruction is: "language_instruction" (a step field) or
                 "observation/natural_language_instruction"; `language_encoding` "text" (a string)
                 or "codepoints" (Language Table: int32 [512] of Unicode code points, 0-padded)
    episode_id   top-level fields joined by "/" into the episode id (the reader's key when absent)
    fps          the control frequency (RLDS does not record one)
    embodiment   the name it is registered under in data_pipelines.embodiments

Actions and state are taken as stored (no gripper re-encoding, no rotation conversion): the
embodiment's description in the registry says what the dimensions are.

    python -m data_pipelines.convert --format=rlds --spec=bridge --input=.../bridge_dataset/1.0.0 ...
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OxeSpec:
    name: str                       # the --spec name
    tfds_name: str                  # the dataset's TFDS name (its builder directory)
    cameras: tuple[str, ...]
    state: tuple[str, ...]
    action_keys: tuple[str, ...] | None   # None: action_path is a Tensor
    language: str
    fps: float
    embodiment: str
    action_path: str = "action"
    language_encoding: str = "text"
    episode_id: tuple[str, ...] = ("episode_metadata/file_path",)

    def __post_init__(self):
        if self.language_encoding not in ("text", "codepoints"):
            raise ValueError(f"spec {self.name}: language_encoding {self.language_encoding!r} is not text or "
                             f"codepoints")
        if not self.cameras:
            raise ValueError(f"spec {self.name}: no cameras")


# RT-1 relative end-effector control: world_vector (3) + rotation_delta (3) + gripper (1).
_EE_DELTA_7 = ("world_vector", "rotation_delta", "gripper_closedness_action")

SPECS: dict[str, OxeSpec] = {s.name: s for s in [
    # RT-1 (Google robot), 3 Hz. The base displacement and terminate_episode fields are left out.
    OxeSpec("fractal", "fractal20220817_data", cameras=("image",),
            state=("base_pose_tool_reached", "gripper_closed"), action_keys=_EE_DELTA_7,
            language="observation/natural_language_instruction", fps=3.0, embodiment="google_robot",
            episode_id=()),
    # Bridge V2 (WidowX 250), 5 Hz, as released by RAIL (bridge_dataset 1.0.0): action is a Tensor
    # [7] = delta xyz, delta roll-pitch-yaw, gripper open.
    OxeSpec("bridge", "bridge_dataset", cameras=("image_0", "image_1", "image_2", "image_3"), state=("state",),
            action_keys=None, language="language_instruction", fps=5.0, embodiment="widowx",
            episode_id=("episode_metadata/file_path", "episode_metadata/episode_id")),
    # DROID (Franka), 15 Hz: end-effector velocity control, action_dict cartesian_velocity (6) +
    # gripper_position (1); proprio cartesian_position (6) + gripper_position (1).
    OxeSpec("droid", "droid", cameras=("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left"),
            state=("cartesian_position", "gripper_position"), action_path="action_dict",
            action_keys=("cartesian_velocity", "gripper_position"), language="language_instruction", fps=15.0,
            embodiment="franka_droid"),
    # Language Table (xArm, planar pushing), 10 Hz: action = delta xy of the end effector.
    OxeSpec("language_table", "language_table", cameras=("rgb",), state=("effector_translation",),
            action_keys=None, language="observation/instruction", language_encoding="codepoints", fps=10.0,
            embodiment="xarm_language_table", episode_id=("episode_id",)),
    # TACO-Play (Franka), 15 Hz: rel_actions_world (7) = delta xyz, delta euler, gripper.
    OxeSpec("taco_play", "taco_play", cameras=("rgb_static", "rgb_gripper"), state=("robot_obs",),
            action_keys=("rel_actions_world",), language="observation/natural_language_instruction", fps=15.0,
            embodiment="franka_taco_play", episode_id=()),
    # JACO Play (Kinova Jaco), 10 Hz: world_vector (3) + gripper_closedness_action (1).
    OxeSpec("jaco_play", "jaco_play", cameras=("image", "image_wrist"), state=("end_effector_cartesian_pos",),
            action_keys=("world_vector", "gripper_closedness_action"),
            language="observation/natural_language_instruction", fps=10.0, embodiment="jaco", episode_id=()),
    # VIOLA (Franka), 20 Hz.
    OxeSpec("viola", "viola", cameras=("agentview_rgb", "eye_in_hand_rgb"), state=("joint_states", "gripper_states"),
            action_keys=_EE_DELTA_7, language="observation/natural_language_instruction", fps=20.0,
            embodiment="franka_viola", episode_id=()),
    # Berkeley Autolab UR5, 5 Hz.
    OxeSpec("berkeley_autolab_ur5", "berkeley_autolab_ur5", cameras=("image", "hand_image"), state=("robot_state",),
            action_keys=_EE_DELTA_7, language="observation/natural_language_instruction", fps=5.0,
            embodiment="ur5_autolab", episode_id=()),
]}


def get_spec(name_or_spec) -> OxeSpec:
    if isinstance(name_or_spec, OxeSpec):
        return name_or_spec
    by_tfds = {s.tfds_name: s for s in SPECS.values()}
    spec = SPECS.get(name_or_spec) or by_tfds.get(name_or_spec)
    if spec is None:
        raise ValueError(f"unknown Open X-Embodiment spec {name_or_spec!r}; specs: {', '.join(SPECS)}")
    return spec
