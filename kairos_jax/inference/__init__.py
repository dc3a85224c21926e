"""Running a trained model: finding and loading it (`checkpoints`), sampling whole clips in any mode
(`sampling`), the streaming engine that generates one step block at a time at constant cost
(`streaming`), open- and closed-loop rollouts (`rollout`), the evaluation harness against baselines
(`evaluate`), frame quality (`quality`), videos and plots (`media`), and the jax.export of the
streaming step for serving (`export`). Command lines: `python -m kairos_jax.rollout`,
`python -m kairos_jax.evaluate`, `python -m kairos_jax.export`."""
