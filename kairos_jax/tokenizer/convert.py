"""Convert a diffusers `AutoencoderKLWan` folder (config.json + *.safetensors) into a tokenizer folder.

    python -m kairos_jax.tokenizer.convert --input=Wan2.1-T2V-1.3B-Diffusers/vae --output=tokenizers/wan21

Every diffusers tensor maps to exactly one parameter of `VideoAutoencoder` (same module path; `weight` ->
`kernel` transposed to channels-last, `gamma` -> `scale` flattened, `resample.1` -> `resample`); the
conversion fails if any tensor is left over or missing, or a shape disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

from kairos_jax.tokenizer.io import Tokenizer, build_model, param_shapes, save
from kairos_jax.tokenizer.model import TokenizerConfig

CONFIG = "config.json"

# diffusers config keys that only concern their runtime (or are checked separately), not the architecture.
_IGNORED = {"latents_mean", "latents_std", "dropout", "scale_factor_spatial", "scale_factor_temporal", "clip_output"}


def config_from_diffusers(d: dict) -> TokenizerConfig:
    """Our architecture config from a diffusers AutoencoderKLWan config.json (defaults as in diffusers)."""
    if d.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"expected an AutoencoderKLWan config, got _class_name={d['_class_name']!r}")
    rename = {"temperal_downsample": "temporal_downsample"}
    fields = {}
    for key, value in d.items():
        if key in _IGNORED or key.startswith("_"):     # diffusers' own bookkeeping (_class_name, ...)
            continue
        name = rename.get(key, key)
        if name not in TokenizerConfig.__dataclass_fields__:
            raise ValueError(f"unsupported AutoencoderKLWan config key {key!r} = {value!r}")
        fields[name] = value
    cfg = TokenizerConfig(**fields)
    for key, ours in (("scale_factor_spatial", cfg.spatial_factor), ("scale_factor_temporal", cfg.temporal_factor)):
        if d.get(key) is not None and int(d[key]) != ours:
            raise ValueError(f"config {key}={d[key]} disagrees with the architecture's factor {ours}")
    return cfg


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy (bfloat16 included, via ml_dtypes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] == "BF16":
            import ml_dtypes
            dtype = ml_dtypes.bfloat16
        elif info["dtype"] in _DTYPES:
            dtype = _DTYPES[info["dtype"]]
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])
    return out


def read_diffusers_folder(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, state dict) of a diffusers model folder (single-file or sharded safetensors)."""
    cfg_path = os.path.join(directory, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory}: no {CONFIG}")
    with open(cfg_path) as f:
        config = json.load(f)
    index = [n for n in os.listdir(directory) if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(directory, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .safetensors weights (pickled .bin weights are not read)")
    state = {}
    for name in files:
        state.update(read_safetensors(os.path.join(directory, name)))
    return config, state


def diffusers_key(path: str) -> str:
    """Our parameter path -> the diffusers state-dict key it comes from."""
    parts = path.split(".")
    leaf = {"kernel": "weight", "scale": "gamma"}.get(parts[-1], parts[-1])
    body = []
    for p in parts[:-1]:
        body.append(p)
        if p == "resample":
            body.append("1")          # nn.Sequential(pad/upsample, conv): the conv is entry 1
    return ".".join(body + [leaf])


def to_ours(key: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A diffusers tensor in our layout (`shape` is our parameter's shape, which tells 1x1 convs from dense)."""
    w = np.asarray(w, np.float32)
    if key.endswith(".weight"):
        if w.ndim == 5:               # Conv3d [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]
            w = w.transpose(2, 3, 4, 1, 0)
        elif w.ndim == 4 and len(shape) == 2:   # 1x1 Conv2d [O, I, 1, 1] -> [I, O]
            w = w[:, :, 0, 0].T
        elif w.ndim == 4:             # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
            w = w.transpose(2, 3, 1, 0)
    elif key.endswith(".gamma"):
        w = w.reshape(-1)
    return w


def convert_state_dict(cfg: TokenizerConfig, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers state dict -> our parameters (float32), checking the mapping is one to one."""
    ours = param_shapes(cfg)
    out, used, errors = {}, set(), []
    for path, shape in ours.items():
        key = diffusers_key(path)
        if key not in state:
            errors.append(f"missing {key} (for {path})")
            continue
        w = to_ours(key, state[key], shape)
        if w.shape != shape:
            errors.append(f"{key} {tuple(state[key].shape)} -> {w.shape}, but {path} is {shape}")
            continue
        out[path] = np.ascontiguousarray(w)
        used.add(key)
    left = sorted(set(state) - used)
    if left:
        errors.append(f"unused diffusers tensors: {left[:10]}{'...' if len(left) > 10 else ''}")
    if errors:
        raise ValueError("diffusers weights do not map onto the tokenizer:\n  " + "\n  ".join(errors))
    return out


def convert(input_dir: str, output_dir: str) -> Tokenizer:
    """Convert the diffusers folder `input_dir` into the tokenizer folder `output_dir`; returns it loaded."""
    config, state = read_diffusers_folder(input_dir)
    cfg = config_from_diffusers(config)
    params = convert_state_dict(cfg, state)
    model = build_model(cfg, params)
    source = {"format": "diffusers/AutoencoderKLWan", "path": os.path.abspath(input_dir),
              "diffusers_version": config.get("_diffusers_version"), "config": config}
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and len(mean) != cfg.z_dim or std is not None and len(std) != cfg.z_dim:
        mean = std = None             # statistics of another latent size (diffusers' defaults on a custom z_dim)
    # diffusers' decode always clamps to [-1, 1] (its AutoencoderKLWan ignores Wan2.2's "clip_output": false),
    # so the converted tokenizer does too by default; decode(..., clip=False) gives the raw output.
    save(output_dir, model, latents_mean=mean, latents_std=std, clip_output=True, source=source, params=params)
    return Tokenizer(model, latents_mean=mean, latents_std=std, clip_output=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kairos_jax.tokenizer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="diffusers AutoencoderKLWan folder (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="tokenizer folder to write")
    args = parser.parse_args(argv)
    tok = convert(args.input, args.output)
    n = sum(int(np.prod(s)) for s in param_shapes(tok.config).values())
    print(f"wrote {args.output}: {n / 1e6:.1f}M parameters, {tok.spatial_compression}x spatial / "
          f"{tok.temporal_compression}x temporal compression, {tok.latent_channels} latent channels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
