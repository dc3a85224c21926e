"""The serving wire format: msgpack with numpy arrays encoded as openpi's `openpi_client.msgpack_numpy`
encodes them, so an openpi client (`WebsocketClientPolicy`) and our server read each other's bytes.

A numpy array is packed as a msgpack map with *binary* (bin-type) keys, in this order:

    {b"__ndarray__": True, b"data": <the array's C-order bytes (bin)>,
     b"dtype": <numpy dtype.str, e.g. "<f4" (str)>, b"shape": <array of ints>}

and a numpy scalar (np.generic) as

    {b"__npgeneric__": True, b"data": <scalar.item()>, b"dtype": <dtype.str>}.

Everything else is plain msgpack (msgpack >= 1.0 defaults: str as str type, bytes as bin type;
tuples and lists as arrays). Arrays of object, void (structured) or complex dtype are refused, as
openpi's packer refuses them.

Unpacking is stricter than openpi's (a server must not trust its input): a map carrying one of the
markers must have exactly the fields above, a dtype whose kind is bool / int / uint / float /
str / bytes, non-negative integer dimensions, and exactly size * itemsize bytes of data; anything
else raises `WireError` naming the field. Unpacked arrays are read-only views of the message.
"""

from __future__ import annotations

import msgpack
import numpy as np

_NDARRAY, _NPGENERIC = b"__ndarray__", b"__npgeneric__"
_REFUSED_KINDS = ("V", "O", "c")         # as openpi's pack_array
_ARRAY_KINDS = "biufSU"
_MAX_DIMS = 32


class WireError(ValueError):
    """A message that is not msgpack in the openpi numpy format; the message says what is wrong."""


def _pack_default(obj):
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in _REFUSED_KINDS:
        raise WireError(f"cannot pack a numpy value of dtype {obj.dtype} (object, void and complex are refused)")
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {_NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack an object of type {type(obj).__name__}")


def _dtype(value, what: str) -> np.dtype:
    if not isinstance(value, str):
        raise WireError(f"{what}: dtype must be a string like '<f4', got {type(value).__name__}")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as e:
        raise WireError(f"{what}: dtype {value!r} is not a numpy dtype ({e})") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"{what}: dtype {value!r} is not allowed (bool, int, uint, float, bytes or str only)")
    return dtype


def _unpack_hook(obj: dict):
    if _NDARRAY in obj:
        if set(obj) != {_NDARRAY, b"data", b"dtype", b"shape"}:
            raise WireError(f"numpy array map has fields {sorted(obj)}; expected __ndarray__, data, dtype, shape")
        dtype = _dtype(obj[b"dtype"], "numpy array")
        shape, data = obj[b"shape"], obj[b"data"]
        if (not isinstance(shape, list | tuple) or len(shape) > _MAX_DIMS
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise WireError(f"numpy array: shape {shape!r} is not a list of at most {_MAX_DIMS} integers >= 0")
        if not isinstance(data, bytes):
            raise WireError(f"numpy array: data must be binary, got {type(data).__name__}")
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if size * dtype.itemsize != len(data):
            raise WireError(f"numpy array of dtype {dtype.str} and shape {tuple(shape)} needs "
                            f"{size * dtype.itemsize} bytes of data; the message has {len(data)}")
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))
    if _NPGENERIC in obj:
        if set(obj) != {_NPGENERIC, b"data", b"dtype"}:
            raise WireError(f"numpy scalar map has fields {sorted(obj)}; expected __npgeneric__, data, dtype")
        dtype = _dtype(obj[b"dtype"], "numpy scalar")
        try:
            return dtype.type(obj[b"data"])
        except (TypeError, ValueError, OverflowError) as e:
            raise WireError(f"numpy scalar: {obj[b'data']!r} is not a {dtype.str} ({e})") from None
    return obj


def packb(obj) -> bytes:
    """obj (dicts, lists, str, numbers, numpy arrays and scalars) -> bytes, as openpi's packb."""
    return msgpack.packb(obj, default=_pack_default)


def unpackb(data: bytes):
    """bytes -> the object (numpy arrays read-only); WireError for anything that is not a single
    msgpack object in this format."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook)
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001  (msgpack raises several types: ExtraData, FormatError, ValueError, ...)
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise WireError(f"not a msgpack message ({detail})") from None
