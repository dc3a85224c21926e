"""Real local data: MuJoCo / dm_control scenes recorded as episodes (docs/architecture.md §5).

One module per source, each with a `Recorder` that owns a simulator and an offscreen renderer and
records one `Episode` per call from a numpy Generator (so a run is reproducible from its seed):

    reacher   dm_control reacher, Jacobian-based reaching policy          actions: 2 joint torques
    cheetah   dm_control cheetah, open-loop gait generator + noise         actions: 6 joint torques
    pusher    3-link planar arm pushing a puck to a goal (own MJCF)       actions: 3 joint targets
    human     dm_control humanoid played kinematically through scripted motions; actions = body
              keypoints of the next pose
    passive_video  objects falling / rolling / sliding with a moving camera; no actions

Frames are recorded at the control rate: frames[t] is observed, then actions[t] is applied.
"""
