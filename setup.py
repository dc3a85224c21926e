"""Kairos-JAX: pre-training a native world model for physical AI in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

JAX = "jax>=0.11.2,<0.13"

setup(
    name="kairos-jax",
    version="0.1.0",
    description="Pre-train a Mixture-of-Transformers world model with Hybrid Linear Temporal Attention.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    # experiments/ ships too: `--config=embedded` names a packaged experiment config.
    packages=find_packages(include=["kairos_jax*", "data_pipelines*", "pallas_kernels*", "experiments*"]),
    package_data={"kairos_jax.scaling": ["gpu_targets/*.txtpb"]},
    install_requires=[
        JAX,
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.8.1",
        "ml-collections>=1.0",
        "absl-py",
        "numpy>=2.0",
        "tensorboardX>=2.6",
        "tqdm",
        "pyarrow>=15",
        "pillow",
        "flatbuffers",  # jax.export serialisation of the streaming rollout step
        "safetensors>=0.4",  # video tokenizer weights (ours and the diffusers checkpoints we convert)
        "websockets>=13",  # python -m kairos_jax.serve (openpi's websocket protocol)
        "msgpack>=1.0",  # its wire format (also a dependency of flax)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "hypothesis", "ruff"],
        # dm_control 1.0.50 is built against mujoco 3.17.0 (newer mujoco breaks its bindings);
        # gymnasium 1.4's mujoco environments accept that version too.
        "sim": ["mujoco==3.17.0", "dm_control==1.0.50", "gymnasium[mujoco]==1.4.0"],
        "video": ["av>=12"],
        # RLDS / TFDS builder directories in array_record format, read without TensorFlow.
        "tfds": ["tensorflow-datasets>=4.9.9"],
        # Ahead-of-time compilation for TPU topologies (libtpu) on any machine.
        "tpu": ["jax[tpu]>=0.11.2,<0.13"],
        # Ahead-of-time compilation for GPU targets (H100/H200) without a GPU.
        "gpu-aot": ["jax-cuda12-plugin>=0.11.2,<0.13"],
        # tfrecord-based RLDS releases (Open X-Embodiment) need TensorFlow itself.
        "rlds": ["tensorflow-cpu", "tensorflow-datasets>=4.9.9"],
        # gs:// and s3:// through fsspec (data_pipelines.storage): data, converter outputs, and (gs:// only,
        # as Orbax writes no s3://) training workdirs. memory:// and local paths need neither.
        # In `make`'s .venv: tests/test_remote_workdir.py trains into a gs:// workdir on a local server.
        "remote": ["gcsfs", "s3fs"],
    },
    entry_points={
        "console_scripts": [
            "kairos-train=kairos_jax.train:run",
            "kairos-convert=data_pipelines.convert:main",
            "kairos-generate=data_pipelines.generate:main",
            "kairos-compile=kairos_jax.compile:run",
            "kairos-rollout=kairos_jax.rollout:run",
            "kairos-evaluate=kairos_jax.evaluate:run",
            "kairos-export=kairos_jax.export:run",
            "kairos-serve=kairos_jax.serve:run",
        ],
    },
)
