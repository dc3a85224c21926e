"""Topology names of the AOT compile CLI (no compiler plugin needed): Cloud TPU slice names, explicit
torus shapes and GPU counts resolve to the shapes the plugins take; bad names say what is expected."""

import math

import pytest

from kairos_jax.scaling import aot


@pytest.mark.parametrize("name, want", [
    # v4 / v5p slices count TensorCores (2 per chip); v5e / v6e count chips (Cloud TPU docs' tables).
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"),
    ("v5p-128", "v5p:4x4x4"), ("v5p-256", "v5p:4x4x8"), ("v4-32", "v4:2x2x4"),
    ("v6e-8", "v6e:2x4"), ("v6e-16", "v6e:4x4"), ("v6e-256", "v6e:16x16"), ("v5e-4", "v5e:2x2"),
    ("8xh100", "h100:1x8"), ("16xh100", "h100:2x8"), ("4xh200", "h200:1x4"),
    ("v5p:2x4x4", "v5p:2x4x4"), ("h100:2x8", "h100:2x8"),
])
def test_names_resolve_to_plugin_shapes(name, want):
    assert aot.canonical_topology(name) == want
    gen, dims = aot.parse_topology(name)
    cores = 2 if gen in ("v4", "v5p") else 1
    if "-" in name:
        assert math.prod(dims) * cores == int(name.split("-")[1])


@pytest.mark.parametrize("name, message", [
    ("v5p-12", "a power of two"), ("v5p-9", "TensorCores"), ("12xh100", "whole hosts of 8"),
    ("v9-8", "expected a slice name"), ("v5p", "expected a slice name"), ("v9:2x2x2", "accelerator one of"),
    ("v5p:2x4", "v5p shapes have 3 numbers"), ("h100:8", "h100 shapes have 2 numbers"),
])
def test_bad_names_say_what_is_expected(name, message):
    with pytest.raises(aot.AotError, match=message):
        aot.parse_topology(name)


def test_gpu_targets_are_kept_in_the_repo():
    h100 = aot.gpu_target_config("h100_sxm.txtpb")
    assert "core_count: 132" in h100 and "device_memory_size: 80000000000" in h100
    assert "cuda_compute_capability { major: 9 minor: 0 }" in h100
    assert dict(aot.CHIPS["h100"].topology_kwargs)["target_config"] == h100
