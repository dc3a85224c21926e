"""Planning for hardware we do not have: the real train step compiled ahead of time for a named TPU
slice or GPU node, with its memory per chip and its FLOPs (`aot`; the command line is
`python -m kairos_jax.compile`). It sits above training because what it compiles is the train step."""
