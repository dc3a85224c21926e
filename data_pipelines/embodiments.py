"""Embodiment registry: name -> action / proprio sizes, action semantics and normalisation.

Ids are stable (they index the model's embodiment embedding table), so a registry only grows:
never renumber or reuse an id. `DEFAULT_REGISTRY` holds the embodiments of the local generators
(`data_pipelines.generate`); converters of external datasets register theirs with new ids.

Normalisation statistics are per source (they are computed by the shard writer over every step it
wrote and stored in `stats.json` beside the shards); `data_pipelines.normalization` turns them into
a `Normalizer` (and its inverse, needed to turn a rollout's actions back into commands).
"""

from __future__ import annotations

import dataclasses

ACTION_SEMANTICS = ("none", "joint_position", "joint_velocity", "joint_torque", "ee_delta", "keypoints")


class UnknownEmbodimentError(KeyError):
    def __str__(self):
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Embodiment:
    name: str
    id: int
    action_dim: int          # 0 for action-free sources (open-world video)
    proprio_dim: int         # 0 when there is no proprioception
    action_semantics: str    # one of ACTION_SEMANTICS
    description: str = ""
    # For absolute joint targets: action dim i is a target for proprio dim action_reference[i] (-1:
    # none). With data.delta_actions, such dims are learned relative to that proprio value at the
    # chunk's start (data_pipelines.normalization.ActionCodec); () for embodiments without one.
    action_reference: tuple[int, ...] = ()

    def __post_init__(self):
        if self.action_semantics not in ACTION_SEMANTICS:
            raise ValueError(f"embodiment {self.name}: action_semantics={self.action_semantics!r} is not "
                             f"one of {ACTION_SEMANTICS}")
        if (self.action_dim == 0) != (self.action_semantics == "none"):
            raise ValueError(f"embodiment {self.name}: action_dim=0 exactly when action_semantics='none'")
        if self.id < 0 or self.action_dim < 0 or self.proprio_dim < 0:
            raise ValueError(f"embodiment {self.name}: id and sizes must be >= 0")
        if self.action_reference and (len(self.action_reference) != self.action_dim or not all(
                -1 <= i < self.proprio_dim for i in self.action_reference)):
            raise ValueError(f"embodiment {self.name}: action_reference={self.action_reference} needs one "
                             f"proprio index (or -1) per action dim ({self.action_dim}), each < proprio_dim="
                             f"{self.proprio_dim}")


class EmbodimentRegistry:
    def __init__(self, embodiments=()):
        self._by_name: dict[str, Embodiment] = {}
        for e in embodiments:
            self.register(e)

    def register(self, e: Embodiment) -> Embodiment:
        old = self._by_name.get(e.name)
        if old is not None and old != e:
            raise ValueError(f"embodiment {e.name} is already registered as {old}")
        for other in self._by_name.values():
            if other.id == e.id and other.name != e.name:
                raise ValueError(f"embodiment id {e.id} of {e.name} is taken by {other.name}")
        self._by_name[e.name] = e
        return e

    def get(self, name: str) -> Embodiment:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownEmbodimentError(
                f"unknown embodiment {name!r}; registered: {sorted(self._by_name)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name, key=lambda n: self._by_name[n].id)

    @property
    def max_id(self) -> int:
        return max((e.id for e in self._by_name.values()), default=-1)


# Body keypoints of the human source, in this order, each (x, y, z) in the pelvis frame.
HUMAN_KEYPOINTS = ("head", "right_elbow", "right_hand", "left_elbow", "left_hand",
                   "right_knee", "right_foot", "left_knee", "left_foot")

DEFAULT_REGISTRY = EmbodimentRegistry([
    Embodiment("passive_camera", 0, action_dim=0, proprio_dim=0, action_semantics="none",
               description="open-world video: a moving camera, no actions"),
    Embodiment("human_keypoints", 1, action_dim=3 * len(HUMAN_KEYPOINTS), proprio_dim=0,
               action_semantics="keypoints",
               description="human behaviour: the next body pose as keypoints "
                           f"{', '.join(HUMAN_KEYPOINTS)} (xyz in the pelvis frame, metres)"),
    Embodiment("reacher", 2, action_dim=2, proprio_dim=8, action_semantics="joint_torque",
               description="dm_control reacher: 2-link planar arm; proprio = cos (2) and sin (2) of the "
                           "joint angles, joint velocities (2), fingertip-to-target vector (2, m)"),
    Embodiment("cheetah", 3, action_dim=6, proprio_dim=17, action_semantics="joint_torque",
               description="dm_control cheetah: planar runner; proprio = qpos without root x (8), "
                           "qvel (9)"),
    Embodiment("pusher", 4, action_dim=3, proprio_dim=14, action_semantics="joint_position",
               description="3-link planar arm pushing a puck to a goal (position-controlled joints); "
                           "proprio = joint angles (3), joint velocities (3), then in the table plane "
                           "(m): fingertip (2), puck (2), puck velocity (2, m/s), goal (2)",
               action_reference=(0, 1, 2)),
    # Open X-Embodiment datasets as published (data_pipelines.oxe): actions and state as stored.
    Embodiment("google_robot", 5, action_dim=7, proprio_dim=8, action_semantics="ee_delta",
               description="RT-1 / fractal20220817_data: world_vector (3), rotation_delta (3, roll-pitch-yaw), "
                           "gripper_closedness_action (1); proprio = base_pose_tool_reached (xyz + quaternion, 7), "
                           "gripper_closed (1); 3 Hz"),
    Embodiment("widowx", 6, action_dim=7, proprio_dim=7, action_semantics="ee_delta",
               description="Bridge V2 (WidowX 250): delta xyz (3), delta roll-pitch-yaw (3), gripper open (1); "
                           "proprio = xyz (3), roll-pitch-yaw (3), gripper (1); 5 Hz"),
    Embodiment("franka_droid", 7, action_dim=7, proprio_dim=7, action_semantics="ee_delta",
               description="DROID (Franka Panda): cartesian_velocity (xyz + roll-pitch-yaw, 6), gripper_position "
                           "(1); proprio = cartesian_position (6), gripper_position (1); 15 Hz"),
    Embodiment("xarm_language_table", 8, action_dim=2, proprio_dim=2, action_semantics="ee_delta",
               description="Language Table (xArm, planar): delta xy of the end effector (2); proprio = "
                           "effector_translation (2); 10 Hz"),
    Embodiment("franka_taco_play", 9, action_dim=7, proprio_dim=15, action_semantics="ee_delta",
               description="TACO-Play (Franka): rel_actions_world = delta xyz (3), delta euler (3), gripper (1); "
                           "proprio = robot_obs (EE pose 6, gripper width 1, joints 7, gripper action 1); 15 Hz"),
    Embodiment("jaco", 10, action_dim=4, proprio_dim=7, action_semantics="ee_delta",
               description="JACO Play (Kinova Jaco): world_vector (3), gripper_closedness_action (1); proprio = "
                           "end_effector_cartesian_pos (7); 10 Hz"),
    Embodiment("franka_viola", 11, action_dim=7, proprio_dim=8, action_semantics="ee_delta",
               description="VIOLA (Franka): world_vector (3), rotation_delta (3), gripper_closedness_action (1); "
                           "proprio = joint_states (7), gripper_states (1); 20 Hz"),
    Embodiment("ur5_autolab", 12, action_dim=7, proprio_dim=15, action_semantics="ee_delta",
               description="Berkeley Autolab UR5: world_vector (3), rotation_delta (3), gripper_closedness_action "
                           "(1); proprio = robot_state (15); 5 Hz"),
    # Meta-World v3 (data_pipelines/sim/metaworld_record.py): its observation without the frame stack.
    Embodiment("metaworld", 13, action_dim=4, proprio_dim=21, action_semantics="ee_delta",
               description="Meta-World v3 Sawyer (metaworld==3.1.1): delta xyz of the hand (3, x 1 cm per unit, "
                           "clipped to [-1, 1]), gripper effort (1, -1 open .. +1 close); proprio = Meta-World's "
                           "observation less its copy of the previous step: hand xyz (3), gripper opening (1), "
                           "object poses (14, zero-padded), goal xyz (3); 80 Hz"),
])
