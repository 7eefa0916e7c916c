"""Read and write MindSpore `.ckpt` files with the `protobuf` package (MindSpore itself is never imported).

The schema is MindSpore's checkpoint.proto:
`Checkpoint { repeated Value value { required string tag; required TensorProto tensor } }`,
`TensorProto { repeated int64 dims; required string tensor_type; required bytes tensor_content }`.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

from mobilenetv2.errors import CheckpointError
from mobilenetv2.files import atomic_write_bytes

MAX_CHECKPOINT_BYTES = 4 << 30  # refuse files beyond 4 GiB before reading them
MAX_TENSOR_DIMS = 8

# MindSpore tensor_type strings <-> numpy dtypes; anything else is refused by name.
_DTYPES = {
    "Float32": np.float32,
    "Float16": np.float16,
    "Float64": np.float64,
    "Int32": np.int32,
    "Int64": np.int64,
    "Int8": np.int8,
    "UInt8": np.uint8,
    "Bool": np.bool_,
}
_TYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


@functools.cache
def _checkpoint_message_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="mobilenetv2_ms_checkpoint.proto", package="mobilenetv2.ms", syntax="proto2")
    tensor = proto.message_type.add(name="TensorProto")
    tensor.field.add(name="dims", number=1, type=field.TYPE_INT64, label=field.LABEL_REPEATED)
    tensor.field.add(name="tensor_type", number=2, type=field.TYPE_STRING, label=field.LABEL_REQUIRED)
    tensor.field.add(name="tensor_content", number=3, type=field.TYPE_BYTES, label=field.LABEL_REQUIRED)
    checkpoint = proto.message_type.add(name="Checkpoint")
    value = checkpoint.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=field.TYPE_STRING, label=field.LABEL_REQUIRED)
    value.field.add(
        name="tensor", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
        type_name=".mobilenetv2.ms.TensorProto",
    )
    checkpoint.field.add(
        name="value", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
        type_name=".mobilenetv2.ms.Checkpoint.Value",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mobilenetv2.ms.Checkpoint"))


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a MindSpore checkpoint, by tag, as numpy arrays (Float16 kept as float16)."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is larger than the {MAX_CHECKPOINT_BYTES} byte limit")
    message = _checkpoint_message_class()()
    try:
        message.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({exc})") from None
    if not message.value:
        raise CheckpointError(f"{path}: not a MindSpore checkpoint (no tensors found)")
    tensors: dict[str, np.ndarray] = {}
    for value in message.value:
        if not value.HasField("tensor"):  # map tensors (embedding tables) have no place in this network
            continue
        if not isinstance(value.tag, str):  # proto2 hands back bytes for a name that is not UTF-8
            raise CheckpointError(f"{path}: a tensor name is not text ({bytes(value.tag)[:40]!r})")
        tensors[value.tag] = _decode_tensor(path, value.tag, value.tensor)
    return tensors


def _decode_tensor(path: Path, tag: str, tensor) -> np.ndarray:
    dtype = _DTYPES.get(tensor.tensor_type)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {tag!r} has unsupported type {tensor.tensor_type!r}")
    dims = list(tensor.dims)
    if len(dims) > MAX_TENSOR_DIMS or any(d < 0 for d in dims):
        raise CheckpointError(f"{path}: tensor {tag!r} has an invalid shape {dims}")
    count = math.prod(dims)
    expected = count * np.dtype(dtype).itemsize
    content = tensor.tensor_content
    if len(content) != expected:
        raise CheckpointError(
            f"{path}: tensor {tag!r} holds {len(content)} bytes but shape {dims} of {tensor.tensor_type} needs {expected}"
        )
    return np.frombuffer(content, dtype=dtype).reshape(dims).copy()


def write_checkpoint(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write tensors in MindSpore's `.ckpt` layout, atomically (temp file then rename)."""
    message = _checkpoint_message_class()()
    for tag, array in tensors.items():
        array = np.ascontiguousarray(array)
        type_name = _TYPE_NAMES.get(array.dtype)
        if type_name is None:
            raise ValueError(f"tensor {tag!r}: dtype {array.dtype} has no MindSpore equivalent")
        value = message.value.add()
        value.tag = tag
        value.tensor.dims.extend(array.shape)
        value.tensor.tensor_type = type_name
        value.tensor.tensor_content = array.tobytes()
    atomic_write_bytes(Path(path), message.SerializeToString())
