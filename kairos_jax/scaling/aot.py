"""Compile the real train step for a TPU slice or GPU cluster without the hardware: memory and FLOPs first.

    python -m kairos_jax.compile --config=kairos_4b --topology=v5p-128 \
        [--phase=phase1_video] [--config.train.batch_size=128 ...]
    python -m kairos_jax.compile --config=kairos_4b --topology=8xh100

(the command line is kairos_jax/compile.py). Topologies: Cloud TPU slice names (v5p-64: 64
TensorCores = 32 chips, 2x4x4; v6e-8: 8 chips, 2x4), explicit shapes (v5p:2x4x4, v6e:2x4), GPU
counts (8xh100 = one host of 8) or hosts x GPUs (h100:2x8). The last stdout line is one JSON
object (topology, devices, peak_bytes_per_device, hbm_bytes_per_device, model_flops_per_step,
...); exit status 3 when the step does not fit, 2 for a bad config or topology.

The step compiled is the one the trainer runs (`trainer.make_train_step`): the config's mesh is
resolved over the topology's chips, the train state is `trainer.abstract_train_state` (shapes and
shardings only) and the batch is abstract with the data config's shapes. Nothing is materialised:
no parameters, no data. XLA's TPU compiler (libtpu) lays the program out in HBM, so a step that
does not fit a TPU fails here, as it would on the slice, with the compiler's own account of the overflow.

Printed: the compiled memory analysis per chip (arguments, outputs, aliased, temporaries, generated
code) against the chip's HBM, and the FLOPs of one step. XLA's cost analysis counts the body of a
loop once (the scan over layers, and any scan over time in a mixer), so the FLOPs come from
counting the matmuls (`dot_general`) of the step's jaxpr with every scan multiplied by its length:
once for the step as compiled (with rematerialisation: what the chips execute) and once with
`model.remat=none` (the model FLOPs behind MFU).

Targets: TPU slices (v4, v5e, v5p, v6e; needs libtpu: `pip install "jax[tpu]==<jax version>"`) and
Hopper GPUs (h100, h200; `--topology=h100:2x8` = 2 hosts of 8 GPUs; needs the CUDA PJRT plugin,
`pip install "jax-cuda12-plugin==<jax version>"`, but no GPU and no CUDA libraries). For GPUs XLA runs
its whole HLO pipeline for sm_90 (SPMD partitioning, fusion, scheduling, buffer assignment, kernel
launch planning) from a target description (`_gpu_target_config`) but does not fail on HBM
overflow: the fit is this tool's comparison of the peak with the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time

import jax

from kairos_jax.config import ConfigError, validate
from kairos_jax.model.world_model import count_params
from kairos_jax.parallel.sharding import activation_sharding, create_mesh
from kairos_jax.training import step as trainer
from kairos_jax.training.metrics import compiled_flops, matmul_flops
from pallas_kernels._dispatch import target_platform


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of an accelerator, as its vendor documents them."""

    platform: str             # "tpu" or "cuda"
    device_kind: str
    hbm_bytes: int
    hbm_stated: str
    peak_bf16_flops: float    # dense
    source: str
    topology_kwargs: tuple = ()
    # For the step-time model (kairos_jax/scaling/estimate.py), bytes/s:
    hbm_bandwidth: float = 0.0
    link_bandwidth: float = 0.0        # one way: per ICI link (TPU) / per GPU over NVLink (GPU)
    inter_host_bandwidth: float = 0.0  # one way per GPU between hosts (GPU)
    wrap_chips: int = 0                # TPU: slices of at least this many chips have wraparound torus axes
    network_source: str = ""


GB, GIB = 10 ** 9, 2 ** 30


_GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


def gpu_target_config(filename: str) -> str:
    """A stream_executor.GpuTargetConfigProto (text format) kept in kairos_jax/gpu_targets/: what
    XLA:GPU needs to compile for a GPU it does not have (limits per compute capability, SM count,
    memory, bandwidth, clock). The files cite their sources."""
    with open(os.path.join(_GPU_TARGETS, filename)) as f:
        return f.read()


# TPUs: cloud.google.com/tpu/docs/<generation>, "key specifications" (HBM capacity and peak bf16
# compute per chip). The docs write "GB" (v5e, v5p, v6e) and "GiB" (v4); the capacities are binary:
# XLA:TPU accepts a v5p program of 93.7 GiB per chip (kairos_4b on v5p:4x4x4, benchmarks/RESULTS.md),
# more than 95e9 bytes. GPUs: NVIDIA's H100 / H200 datasheets (SXM; dense bf16 tensor-core peak,
# half the "with sparsity" figure; memory in decimal GB, as NVIDIA counts it).
#
# Network and HBM bandwidth, same pages: v5p "HBM bandwidth per chip 2765 GBps", "bidirectional
# ICI bandwidth per chip 1200 GBps" over 6 links (3-D torus) = 100 GB/s one way per link; v6e
# "HBM bandwidth 1640 GBps", ICI "3584 Gbps" per chip over 4 ports (2-D torus, "bidirectional
# 800 GBps" in the newer page) = 100 GB/s one way per link; v5e 819 GBps HBM, ICI 1600 Gbps over
# 4 ports = 50 GB/s; v4 1200 GBps HBM, 45 GB/s one way per link ("How to Scale Your Model",
# jax-ml.github.io/scaling-book, TPU chapter). Wraparound: a v4 / v5p slice's axes wrap from a
# full cube (4x4x4, 64 chips); v5e / v6e from the full 16x16 pod (scaling-book, same chapter).
# H100 SXM: 3.35 TB/s HBM3, NVLink 900 GB/s per GPU (both directions) = 450 GB/s one way; H200
# SXM: 4.8 TB/s HBM3e, same NVLink. Between hosts (DGX H100 / HGX H200): one ConnectX-7 400 Gb/s
# InfiniBand port per GPU = 50 GB/s one way (NVIDIA DGX H100 datasheet).
_TPU_NET = "cloud.google.com/tpu/docs/{} (HBM bandwidth, ICI bandwidth per chip and ports)"
_GPU_NET = ("NVIDIA {} datasheet (HBM bandwidth, NVLink 900 GB/s per GPU); NVIDIA DGX H100 datasheet "
            "(8 x ConnectX-7 400 Gb/s, one per GPU)")
CHIPS = {
    "v4": Chip("tpu", "TPU v4", 32 * GIB, "32 GiB", 275e12, "cloud.google.com/tpu/docs/v4",
               (("chip_config_name", "megacore"),), hbm_bandwidth=1200 * GB, link_bandwidth=45 * GB,
               wrap_chips=64, network_source=_TPU_NET.format("v4") + "; ICI per link: scaling-book"),
    "v5e": Chip("tpu", "TPU v5 lite", 16 * GIB, "16 GiB", 197e12, "cloud.google.com/tpu/docs/v5e",
                hbm_bandwidth=819 * GB, link_bandwidth=50 * GB, wrap_chips=256, network_source=_TPU_NET.format("v5e")),
    "v5p": Chip("tpu", "TPU v5", 95 * GIB, "95 GiB", 459e12, "cloud.google.com/tpu/docs/v5p",
                hbm_bandwidth=2765 * GB, link_bandwidth=100 * GB, wrap_chips=64, network_source=_TPU_NET.format("v5p")),
    "v6e": Chip("tpu", "TPU v6 lite", 32 * GIB, "32 GiB", 918e12, "cloud.google.com/tpu/docs/v6e",
                hbm_bandwidth=1640 * GB, link_bandwidth=100 * GB, wrap_chips=256,
                network_source=_TPU_NET.format("v6e")),
    "h100": Chip("cuda", "NVIDIA H100 80GB HBM3", 80 * GB, "80 GB", 989e12, "NVIDIA H100 datasheet (SXM5)",
                 (("target_config", gpu_target_config("h100_sxm.txtpb")),), hbm_bandwidth=3350 * GB,
                 link_bandwidth=450 * GB, inter_host_bandwidth=50 * GB, network_source=_GPU_NET.format("H100")),
    "h200": Chip("cuda", "NVIDIA H200", 141 * GB, "141 GB", 989e12, "NVIDIA H200 datasheet (SXM)",
                 (("target_config", gpu_target_config("h200_sxm.txtpb")),), hbm_bandwidth=4800 * GB,
                 link_bandwidth=450 * GB, inter_host_bandwidth=50 * GB, network_source=_GPU_NET.format("H200")),
}
_SHAPE_HELP = {"tpu3": "2x2x2 (chips per axis of the 3-D torus)", "tpu2": "2x4 (chips per axis of the 2-D torus)",
               "cuda": "2x8 (hosts x GPUs per host)"}


class AotError(RuntimeError):
    """The target cannot be compiled for: a bad topology name, or the compiler plugin missing."""


# Cloud TPU slice names count TensorCores for the megacore generations (v4, v5p: 2 per chip, one
# JAX device per chip) and chips for the single-core ones (v5e, v6e).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def _torus_shape(chips: int, ndim: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for a power-of-two chip count: grow the smallest axis, the
    last one first (v5p: 4 chips 1x2x2 ~ 2x2x1, 8 2x2x2, 16 2x2x4, 32 2x4x4, 64 4x4x4, 128 4x4x8;
    v6e: 8 chips 2x4, 16 4x4, 64 8x8, 256 16x16)."""
    dims = [1] * ndim
    while math.prod(dims) < chips:
        i = max(j for j in range(ndim) if dims[j] == min(dims))
        dims[i] *= 2
    return tuple(sorted(dims, reverse=True)) if chips < 2 ** ndim else tuple(dims)   # v5p-8: 2x2x1


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """A target -> (accelerator, shape).

    TPU: 'v5p:4x4x4' (chips per torus axis) or the Cloud TPU slice name 'v5p-128' (TensorCores for
    v4 / v5p, chips for v5e / v6e) -> ('v5p', (4, 4, 4)). GPU: 'h100:2x8' (hosts x GPUs per host)
    or '16xh100' (GPUs, 8 per host) -> ('h100', (2, 8)).
    """
    gen, sep, shape = topology.partition(":")
    if not sep:
        count, x, gpu = topology.partition("x")
        name, dash, size = topology.partition("-")
        if x and gpu in CHIPS and CHIPS[gpu].platform == "cuda" and count.isdigit() and int(count) > 0:
            n = int(count)
            if n > 8 and n % 8:
                raise AotError(f"--topology={topology!r}: more than 8 GPUs must be whole hosts of 8")
            return gpu, (max(1, n // 8), min(n, 8))
        if dash and name in _CORES_PER_CHIP and size.isdigit() and int(size) > 0:
            n, per = int(size), _CORES_PER_CHIP[name]
            chips = n // per
            if n % per or chips & (chips - 1):
                raise AotError(f"--topology={topology!r}: {name} slices are named by "
                               f"{'TensorCores (2 per chip)' if per == 2 else 'chips'}, a power of two"
                               f"{' from 8' if per == 2 else ''}, e.g. {name}-{8 * per}")
            return name, _torus_shape(chips, 2 if name in ("v5e", "v6e") else 3)
        raise AotError(f"--topology={topology!r}: expected a slice name like v5p-64 or v6e-8, a GPU count like "
                       f"8xh100, or <accelerator>:<shape> like v5p:2x2x2 or h100:2x8, with accelerator one of "
                       f"{sorted(CHIPS)}")
    if gen not in CHIPS:
        raise AotError(f"--topology={topology!r}: expected <accelerator>:<shape>, e.g. v5p:2x2x2 or h100:2x8, "
                       f"with accelerator one of {sorted(CHIPS)}")
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise AotError(f"--topology={topology!r}: the shape must be positive integers joined by 'x'")
    kind = "cuda" if CHIPS[gen].platform == "cuda" else ("tpu2" if gen in ("v5e", "v6e") else "tpu3")
    want = 3 if kind == "tpu3" else 2
    if len(dims) != want:
        raise AotError(f"--topology={topology!r}: {gen} shapes have {want} numbers, e.g. {_SHAPE_HELP[kind]}")
    return gen, dims


def canonical_topology(topology: str) -> str:
    """'v5p-64' -> 'v5p:2x4x4', '8xh100' -> 'h100:1x8' (the form the compiler plugins take)."""
    gen, dims = parse_topology(topology)
    return f"{gen}:{'x'.join(map(str, dims))}"


def libtpu_available() -> bool:
    return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def cuda_plugin_available() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def topology_devices(topology: str) -> list:
    """Compile-only devices of the target: one per TPU chip (v4 and v5p as megacore chips) or GPU."""
    from jax.experimental import topologies

    gen, dims = parse_topology(topology)
    topology = canonical_topology(topology)
    chip = CHIPS[gen]
    if chip.platform == "tpu":
        if not libtpu_available():
            raise AotError(f"compiling for {topology} needs libtpu (XLA's TPU compiler), which is not installed "
                           f"in {sys.prefix}: pip install \"jax[tpu]=={jax.__version__}\"")
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                 **dict(chip.topology_kwargs)).devices)
    if not cuda_plugin_available():
        raise AotError(f"compiling for {topology} needs the CUDA PJRT plugin (XLA's GPU compiler), which is not "
                       f"installed in {sys.prefix}: pip install \"jax-cuda12-plugin=={jax.__version__}\" (no CUDA "
                       "libraries or GPU needed to compile)")
    try:
        topo = topologies.get_topology_desc(topology_name="", platform="cuda", topology=f"1x{dims[0]}x{dims[1]}",
                                            **dict(chip.topology_kwargs))
    except NotImplementedError as e:
        raise AotError(f"the CUDA plugin did not register (JAX initialised it expecting a GPU): run with "
                       f"JAX_PLATFORMS=cpu to compile for {topology} on a machine without one ({e})") from None
    return list(topo.devices)


# FLOP counting ----------------------------------------------------------------------------------

def step_flops(cfg, mesh, phase_name: str) -> tuple[float, list[str]]:
    """Global matmul FLOPs of one train step of `cfg` on `mesh` (traced, not compiled)."""
    setup = trainer.build_model_setup(cfg, mesh)
    phase = cfg.phases[phase_name]
    tx = trainer.make_optimizer(cfg.train, phase.steps)
    step = trainer.make_train_step(cfg, setup, tx, phase, num_sources=len(phase.mixture))
    with activation_sharding(setup.mesh, setup.rules):
        closed = jax.make_jaxpr(step.jitted)(trainer.abstract_train_state(tx, setup), trainer.abstract_batch(setup))
    return matmul_flops(closed.jaxpr)


# Compilation ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    topology: str
    chips: int
    device_kind: str
    mesh: dict
    phase: str
    remat: str
    params: int
    batch_size: int
    tokens_per_step: int
    lower_s: float
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    hbm_stated: str
    hbm_source: str
    peak_bf16_flops: float
    xla_flops_per_chip: float | None      # XLA cost analysis (loop bodies counted once)
    step_flops: float                     # as compiled (with remat), all chips
    model_flops: float                    # remat=none, all chips
    uncounted_loops: list
    # Not printed: the compiled executable and the mesh it was compiled over (the step-time
    # estimate reads the optimized HLO and maps replica groups to chips; kairos_jax/scaling/estimate.py).
    compiled: object = dataclasses.field(default=None, repr=False, compare=False)
    mesh_obj: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def peak_bytes(self) -> int:
        """HBM live at once per chip: arguments and outputs (donated ones counted once) + temporaries
        + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    def summary(self) -> dict:
        """The CLI's last stdout line (one JSON object)."""
        return {
            "topology": self.topology, "target": canonical_topology(self.topology), "devices": self.chips,
            "device_kind": self.device_kind, "mesh": self.mesh, "phase": self.phase,
            "params": self.params, "batch_size": self.batch_size, "tokens_per_step": self.tokens_per_step,
            "argument_bytes_per_device": self.argument_bytes, "output_bytes_per_device": self.output_bytes,
            "alias_bytes_per_device": self.alias_bytes, "temp_bytes_per_device": self.temp_bytes,
            "code_bytes_per_device": self.code_bytes, "peak_bytes_per_device": self.peak_bytes,
            "hbm_bytes_per_device": self.hbm_bytes, "hbm_used_fraction": self.peak_bytes / self.hbm_bytes,
            "fits": self.fits, "remat": self.remat, "step_flops": self.step_flops,
            "model_flops_per_step": self.model_flops, "model_flops_per_token": self.model_flops_per_token,
            "xla_flops_per_device": self.xla_flops_per_chip, "compile_s": self.compile_s,
        }

    def estimate(self):
        """The step-time model of this compile on its target (kairos_jax/scaling/estimate.py)."""
        from kairos_jax.scaling import estimate as est

        gen, dims = parse_topology(self.topology)
        target = est.target_for(CHIPS[gen], list(self.mesh_obj.devices.flat), name=canonical_topology(self.topology),
                                dims=dims)
        return est.estimate(self.compiled.as_text(), target, step_flops=self.step_flops, model_flops=self.model_flops,
                            chips=self.chips, tokens_per_step=self.tokens_per_step)

    @property
    def model_flops_per_token(self) -> float:
        return self.model_flops / self.tokens_per_step

    def format(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB"
        peak_pod = self.chips * self.peak_bf16_flops
        lines = [
            f"AOT compile of the train step for {self.topology}: {self.chips} devices ({self.device_kind}), "
            f"mesh {self.mesh}, phase {self.phase}",
            f"  model {self.params / 1e6:,.1f}M parameters; global batch {self.batch_size} clips = "
            f"{self.tokens_per_step:,} tokens/step",
            f"  lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s",
            "  memory per device (compiled.memory_analysis()):",
            f"    arguments      {g(self.argument_bytes)}   (train state shard + batch shard)",
            f"    outputs        {g(self.output_bytes)}",
            f"    aliased        {g(self.alias_bytes)}   (donated state: outputs reuse argument buffers)",
            f"    temporaries    {g(self.temp_bytes)}",
            f"    generated code {g(self.code_bytes)}",
            f"    peak           {g(self.peak_bytes)}   = arguments + outputs - aliased + temporaries + code",
            f"    HBM per device {g(self.hbm_bytes)}   ({self.hbm_stated}, {self.hbm_source}): "
            + (f"FITS, {self.peak_bytes / self.hbm_bytes:.0%} used" if self.fits else
               f"DOES NOT FIT, {self.peak_bytes / self.hbm_bytes:.0%} of HBM"),
            "  FLOPs (matmuls of the step's jaxpr, scans times their length):",
            f"    per step as compiled (remat={self.remat})  {self.step_flops:.4g} = "
            f"{self.step_flops / self.chips:.4g} per device",
            f"    model FLOPs per step (remat=none)  {self.model_flops:.4g}",
            f"    model FLOPs per token              {self.model_flops_per_token:.4g}  "
            f"(6 x params = {6 * self.params:.4g})",
            "    XLA cost analysis per device       "
            + (f"{self.xla_flops_per_chip:.4g}  (counts each loop body once: not a step count)"
               if self.xla_flops_per_chip is not None else "n/a"),
            f"    at 100% MFU ({self.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per device) a step takes "
            f"{_seconds(self.model_flops / peak_pod)}; at 40% MFU {_seconds(self.model_flops / peak_pod / 0.4)} "
            f"({0.4 * peak_pod * self.tokens_per_step / self.model_flops:,.0f} tokens/s)",
        ]
        if self.uncounted_loops:
            lines.append(f"    note: {len(self.uncounted_loops)} while loop(s) with a dynamic trip count "
                         "counted once")
        return "\n".join(lines)


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.3f} ms"


def compile_for_topology(cfg, topology: str, phase: str | None = None) -> Report:
    """Lower and compile the real train step of `cfg` for a target topology; see the module docstring."""
    validate(cfg)
    phase = phase or cfg.curriculum[0]
    if phase not in cfg.phases:
        raise ConfigError(f"--phase={phase!r} is not a key of config.phases ({sorted(cfg.phases)})")
    gen, _ = parse_topology(topology)
    chip = CHIPS[gen]
    devices = topology_devices(topology)
    mesh = create_mesh(cfg.mesh, devices)
    setup = trainer.build_model_setup(cfg, mesh)
    phase_cfg = cfg.phases[phase]
    tx = trainer.make_optimizer(cfg.train, phase_cfg.steps)
    step = trainer.make_train_step(cfg, setup, tx, phase_cfg, num_sources=len(phase_cfg.mixture))
    state, batch = trainer.abstract_train_state(tx, setup), trainer.abstract_batch(setup)
    # The mixers dispatch for the target (Pallas kernels lowered for it), not for this host's CPU.
    with activation_sharding(setup.mesh, setup.rules), target_platform("gpu" if chip.platform == "cuda" else "tpu"):
        t0 = time.perf_counter()
        lowered = step.jitted.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    flops, unknown = step_flops(cfg, mesh, phase)
    if cfg.model.remat == "none":
        model_flops = flops
    else:
        plain = cfg.copy_and_resolve_references()
        plain.model.remat = "none"
        model_flops, _ = step_flops(plain, mesh, phase)
    lay = setup.layout
    return Report(
        topology=topology, chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
        phase=phase, remat=cfg.model.remat, params=count_params(setup.abstract_params), batch_size=cfg.train.batch_size,
        tokens_per_step=cfg.train.batch_size * lay.num_blocks * lay.block_size,
        lower_s=t1 - t0, compile_s=t2 - t1,
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        hbm_bytes=chip.hbm_bytes, hbm_stated=chip.hbm_stated, hbm_source=chip.source,
        peak_bf16_flops=chip.peak_bf16_flops, xla_flops_per_chip=compiled_flops(compiled),
        step_flops=flops, model_flops=model_flops, uncounted_loops=unknown, compiled=compiled, mesh_obj=mesh)
