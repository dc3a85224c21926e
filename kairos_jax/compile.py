"""Ahead-of-time compile of the real train step for a TPU slice or GPU node, without the hardware.

    python -m kairos_jax.compile --config=experiments/kairos_4b.py --topology=v5p-64

The implementation and its documentation are in kairos_jax/aot.py; this is its command-line name.
"""

from kairos_jax.aot import run

if __name__ == "__main__":
    run()
