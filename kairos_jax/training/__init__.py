"""Training: the loop over a curriculum of phases (`loop`: data, checkpoints, metrics, SIGTERM), the
jitted train step and the sharded train state it updates (`step`), Orbax checkpoints of model +
optimizer + data iterator (`checkpointing`), and the metrics written to TensorBoard and JSON lines
(`metrics`). The command line is `python -m kairos_jax.train`."""
