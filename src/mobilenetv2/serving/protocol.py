"""The Open Inference Protocol's tensors, shared by the REST app and the gRPC service: the request's input checked
against the model, the outputs it asks for (the logits, raw or as the classification extension's
"score:index:label" strings), and Triton's binary tensor data extension (raw little-endian tensors after the JSON
header, `binary_data_size` naming each one's length). Every refusal is a ProtocolError carrying the HTTP status it
answers with; nothing here touches the model."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import numpy as np

# the datatypes an input may come in; each is converted to the model's FP32 (FP16 halves what goes over the wire)
INPUT_DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8")}
OUTPUT = "logits"
# what GET /v2 and ServerMetadata list: the protocol's extensions this server implements in full
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration"]
MAX_JSON_HEADER = 1 << 20  # the JSON part of a binary request: a header, not a tensor sent as text


class ProtocolError(Exception):
    """A request the protocol refuses, answered with `status` (HTTP) and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestError(ProtocolError):
    """A request the server refuses (REST and gRPC alike): `status`, the message and any HTTP headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(status, message)
        self.headers = headers or {}


@dataclass(frozen=True)
class ModelInfo:
    """What a client may learn about the served model."""
    name: str
    platform: str
    image_size: int
    class_names: list
    preprocess: dict
    max_batch: int
    max_delay_ms: float
    version: str = "1"

    def metadata(self) -> dict:
        size = self.image_size
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}],
                "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(self.class_names)]}],
                "parameters": {"class_names": self.class_names, "preprocess": self.preprocess,
                               "max_batch_size": self.max_batch}}

    def config(self) -> dict:
        """Triton's model configuration, as far as it describes this server (dims exclude the batch)."""
        return {"name": self.name, "platform": self.platform, "max_batch_size": self.max_batch,
                "input": [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                           "dims": [3, self.image_size, self.image_size]}],
                "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [len(self.class_names)],
                            "label_filename": "class_names"}],
                "dynamic_batching": {"max_queue_delay_microseconds": int(self.max_delay_ms * 1000)},
                "version_policy": {"specific": {"versions": [int(self.version)]}}}


@dataclass
class Requested:
    """One output a request asks for: the logits, or their top `classes` as strings; raw bytes or JSON."""
    binary: bool = False
    classes: int = 0


@dataclass
class InferRequest:
    images: np.ndarray
    id: str | None = None
    outputs: list[Requested] = field(default_factory=lambda: [Requested()])


def byte_count(text: str | None) -> int | None:
    """A header's decimal byte count, or None: ASCII digits only (str.isdigit() also takes '²', which int() does
    not), at most 18 of them."""
    text = (text or "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header of a REST request and the binary tensors after it (`Inference-Header-Content-Length`)."""
    if header_length is None:
        length = len(body)
    elif byte_count(header_length) is None:
        raise ProtocolError(400, f"Inference-Header-Content-Length must be a byte count, got {header_length[:40]!r}")
    else:
        length = byte_count(header_length)
        if length > len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {length} is past the body's {len(body)} bytes")
        if length > MAX_JSON_HEADER:
            raise ProtocolError(400, f"the JSON header is over {MAX_JSON_HEADER} bytes")
    try:
        request = json.loads(bytes(body[:length]))
    except ValueError as exc:
        raise ProtocolError(400, f"malformed JSON: {str(exc)[:200]}") from None
    except RecursionError:  # arrays nested thousands deep
        raise ProtocolError(400, "malformed JSON: nested too deep") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request must be a JSON object")
    return request, memoryview(body)[length:]


def _parameters(item: dict, what: str) -> dict:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"{what} parameters must be an object")
    return parameters


def decode_request(request: dict, binary: memoryview | list[bytes], info: ModelInfo) -> InferRequest:
    """The checked images and outputs of a request. `binary` is what followed the JSON header (REST: one buffer the
    inputs' `binary_data_size` cut in order) or gRPC's `raw_input_contents` (one buffer per input)."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, "the request must have exactly one input, named 'input'")
    tensor = inputs[0]
    if tensor.get("name") != "input":
        raise ProtocolError(400, f"unknown input {str(tensor.get('name'))[:80]!r}; the model takes 'input'")
    datatype = tensor.get("datatype")
    if datatype not in INPUT_DATATYPES:
        raise ProtocolError(400, f"input datatype must be one of {', '.join(INPUT_DATATYPES)}, got "
                                 f"{str(datatype)[:20]!r}")
    size = info.image_size
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(type(d) is int for d in shape)
            or shape[0] < 1 or shape[1:] != [3, size, size]):
        raise ProtocolError(400, f"input shape must be [N, 3, {size}, {size}], got {str(shape)[:80]}")
    if shape[0] > info.max_batch:
        raise ProtocolError(400, f"{shape[0]} images in one request; this server batches at most {info.max_batch}")
    count, dtype = int(np.prod(shape)), INPUT_DATATYPES[datatype]
    declared = _parameters(tensor, "input").get("binary_data_size")
    if _parameters(tensor, "input").get("shared_memory_region") is not None:
        raise ProtocolError(400, "shared memory is not supported by this server")
    if isinstance(binary, list):  # gRPC: raw_input_contents, or the typed contents already in "data"
        raw = binary[0] if binary else None
        if raw is not None and len(binary) != 1:
            raise ProtocolError(400, f"{len(binary)} raw input contents for one input")
    elif declared is not None:
        if type(declared) is not int or declared < 0:
            raise ProtocolError(400, f"binary_data_size must be a byte count, got {str(declared)[:40]}")
        if declared != len(binary):
            raise ProtocolError(400, f"binary_data_size {declared} does not match the {len(binary)} bytes after the "
                                     f"JSON header")
        raw = binary
    else:
        if len(binary):
            raise ProtocolError(400, f"{len(binary)} bytes after the JSON header, but no input has binary_data_size")
        raw = None
    if raw is not None and tensor.get("data") is not None:  # as Triton: one tensor, one source
        raise ProtocolError(400, "input has both binary contents and 'data': send one")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(400, f"input has {len(raw)} bytes; {datatype} of shape {shape} needs "
                                     f"{count * dtype.itemsize}")
        data = np.frombuffer(raw, dtype=dtype)
    else:
        try:
            data = np.asarray(tensor.get("data"), dtype=np.float64)
        except (TypeError, ValueError, OverflowError, RecursionError):  # OverflowError: an integer of 400 digits
            raise ProtocolError(400, "input data must be numbers within float range") from None
        if data.size != count:
            raise ProtocolError(400, f"input data has {data.size} values, shape {shape} needs {count}")
    images = data.astype(np.float32).reshape(shape)
    if not np.all(np.isfinite(images)):
        raise ProtocolError(400, "input data must be finite")
    request_id = request.get("id")
    return InferRequest(images, None if request_id is None else str(request_id)[:256],
                        _requested(request, len(info.class_names)))


def _requested(request: dict, classes: int) -> list[Requested]:
    everything_binary = _parameters(request, "request").get("binary_data_output", False)
    if not isinstance(everything_binary, bool):
        raise ProtocolError(400, "binary_data_output must be true or false")
    outputs = request.get("outputs")
    if outputs is None:
        return [Requested(binary=everything_binary)]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(400, "outputs must be a list of objects")
    wanted = []
    for output in outputs:
        if output.get("name") != OUTPUT:
            raise ProtocolError(400, f"unknown output {str(output.get('name'))[:80]!r}; the model gives '{OUTPUT}'")
        parameters = _parameters(output, "output")
        binary, count = parameters.get("binary_data", everything_binary), parameters.get("classification", 0)
        if not isinstance(binary, bool):
            raise ProtocolError(400, "binary_data must be true or false")
        if type(count) is not int or not 0 <= count <= classes:
            raise ProtocolError(400, f"classification must be 0 to {classes} (the model's classes), got "
                                     f"{str(count)[:20]}")
        if parameters.get("shared_memory_region") is not None:
            raise ProtocolError(400, "shared memory is not supported by this server")
        wanted.append(Requested(binary, count))
    if len(wanted) > 1:
        raise ProtocolError(400, f"the output '{OUTPUT}' is asked for {len(wanted)} times")
    return wanted


def classification(logits: np.ndarray, count: int, names: list) -> np.ndarray:
    """The classification extension: each image's top `count` as "score:index:label" (score: the logit), best
    first, ties to the lower index, as an object array of bytes shaped (N, count)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    return np.array([[f"{row[i]:f}:{i}:{names[i]}".encode() for i in top] for row, top in zip(logits, order)],
                    dtype=object).reshape(len(logits), count)


def serialize_bytes(strings: np.ndarray) -> bytes:
    """A BYTES tensor in the binary extension's layout: each element as a little-endian uint32 length, then it."""
    return b"".join(len(s).to_bytes(4, "little") + s for s in strings.reshape(-1))


def encode_outputs(logits: np.ndarray, wanted: list[Requested], names: list) -> tuple[list[dict], list[bytes]]:
    """The response's outputs (JSON) and the binary buffers that follow them, in order."""
    outputs, buffers = [], []
    for output in wanted:
        if output.classes:
            tensor = classification(logits, output.classes, names)
            entry = {"name": OUTPUT, "datatype": "BYTES", "shape": list(tensor.shape)}
            raw = serialize_bytes(tensor) if output.binary else None
            data = None if output.binary else [s.decode() for s in tensor.reshape(-1)]
        else:
            entry = {"name": OUTPUT, "datatype": "FP32", "shape": list(logits.shape)}
            raw = np.ascontiguousarray(logits, dtype="<f4").tobytes() if output.binary else None
            data = None if output.binary else logits.reshape(-1).tolist()
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    return outputs, buffers


def inflated(raw: bytes, encoding: str, limit: int, limit_mb: float) -> bytes:
    """A body sent gzip- or deflate-encoded (tritonclient's request compression), inflated to at most `limit`
    bytes: a small body must not unpack into gigabytes. Every gzip member is read, as gzip itself reads them (a
    body compressed in pieces is their concatenation); bytes after the last member, or after a deflate stream, are
    refused."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate or none)")
    pieces, rest, size = [], raw, 0
    while True:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        try:
            data = inflater.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise RequestError(400, f"body is not valid {encoding}: {exc}") from None
        size += len(data)
        if size > limit or inflater.unconsumed_tail:
            raise RequestError(413, f"the decompressed body is over --max-body-mb {limit_mb:g}")
        if not inflater.eof:
            raise RequestError(400, f"body is not valid {encoding}: it ends early")
        pieces.append(data)
        rest = inflater.unused_data
        if not rest:
            return b"".join(pieces)
        if encoding == "deflate" or rest[:2] != b"\x1f\x8b":  # gzip's magic starts each member
            raise RequestError(400, f"body is not valid {encoding}: {len(rest)} bytes after the end of its stream")
