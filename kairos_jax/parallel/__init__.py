"""How arrays are laid out over devices: the mesh and the logical-axis rules that shard parameters and
activations (`sharding`), and context parallelism, the temporal mixers with the sequence split over
the `context` mesh axis (`context_parallel`). The model and the train step use both; neither names a
mesh axis of its own."""
