"""The HTTP app (FastAPI on uvicorn: the `serve` extra): KServe's Open Inference Protocol v2 (health, model metadata, FP32 tensor inference), `/v1/classify`
for an image, Prometheus metrics, and the web page. Every request to the model goes through one DynamicBatcher.
Bad input of any kind is a 4xx with a JSON body `{"error": ...}`; it never reaches the model."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from mobilenetv2.data.folders import DECODE_ERRORS, decode_rgb
from mobilenetv2.data.transforms import eval_transform
from mobilenetv2.deploy.predict import Classifier
from mobilenetv2.serving.batcher import DynamicBatcher, QueueFull, Stopped

DRAIN_FACTOR = 2  # an over-long body is read and dropped up to this many times --max-body-mb before the 413
MAX_TOPK = 100


@dataclass(frozen=True)
class ServeOptions:
    name: str = "mobilenetv2"
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images waiting; beyond it requests get 503 with Retry-After
    timeout_s: float = 30.0  # per request, queue and model together
    max_body_mb: float = 16.0


class RequestError(Exception):
    """A request we refuse: `status` and a message for the JSON body."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _metrics():
    registry = CollectorRegistry()
    return registry, {
        "requests": Counter("mobilenetv2_requests", "HTTP requests by endpoint and status code",
                            ["endpoint", "code"], registry=registry),
        "latency": Histogram("mobilenetv2_request_seconds", "request latency by endpoint", ["endpoint"],
                             registry=registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        "batch": Histogram("mobilenetv2_batch_size", "images per model call", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        "queue": Gauge("mobilenetv2_queue_images", "images waiting for the model", registry=registry),
    }


def _page(name: str) -> str:
    import html

    text = resources.files("mobilenetv2").joinpath("resources/serve_page.html").read_text()
    return text.replace("{{MODEL_NAME}}", html.escape(name, quote=True))


def create_app(classifier: Classifier, options: ServeOptions, platform: str):
    """The FastAPI app serving `classifier` (any engine) under `options.name`."""

    registry, metric = _metrics()
    preprocess = classifier.preprocess
    size = preprocess.image_size
    names = classifier.class_names or [str(i) for i in range(classifier.num_classes)]
    transform = eval_transform(preprocess)

    def prepared(data: bytes) -> np.ndarray:
        """An image file's bytes as the model's (1, 3, size, size) input, decoded within MAX_PIXELS."""
        try:
            return transform(decode_rgb(io.BytesIO(data)))[None].numpy()
        except DECODE_ERRORS as exc:
            raise RequestError(415, f"not a readable image ({exc.__class__.__name__}: {str(exc)[:120]})") from None

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(classifier.forward(torch.from_numpy(images)).float().cpu().numpy(), dtype=np.float32)

    def observe(batch: int, queued: int) -> None:
        metric["batch"].observe(batch)
        metric["queue"].set(queued)

    batcher = DynamicBatcher(forward, options.max_batch, options.max_delay_ms / 1000, options.max_queue, observe)
    state = {"ready": False}

    async def lifespan(_app):
        batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.drain(timeout_s=5.0)

    app = FastAPI(title="mobilenetv2", description="MobileNetV2 inference: Open Inference Protocol v2, "
                  "image classification, Prometheus metrics", lifespan=lifespan)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(_request, exc: RequestError):
        return error(exc.status, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return error(422, f"invalid request: {exc.errors()[0].get('msg', 'bad value') if exc.errors() else exc}")

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = getattr(request.scope.get("route"), "path", "unmatched")  # set by routing, during call_next
        metric["requests"].labels(endpoint, str(response.status_code)).inc()
        metric["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def body(request: Request) -> bytes:
        """The request's body, at most --max-body-mb. A longer one is answered 413 after reading (and dropping) up
        to DRAIN_FACTOR times the limit: a client still sending when the server closed would see its connection
        reset instead of the answer. Past that, the answer goes out at once and the connection closes unread."""
        limit = int(options.max_body_mb * (1 << 20))
        declared = request.headers.get("content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        declared_over = declared is not None and declared > limit
        too_long = RequestError(413, f"body{f' of {declared} bytes' if declared_over else ''} is over --max-body-mb "
                                     f"{options.max_body_mb:g}")
        if declared_over and declared > DRAIN_FACTOR * limit:
            raise too_long
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > DRAIN_FACTOR * limit:
                break
            if total <= limit:
                chunks.append(chunk)
        if declared_over or total > limit:
            raise too_long
        return b"".join(chunks)

    async def run(images: np.ndarray) -> np.ndarray:
        try:
            return await asyncio.wait_for(batcher.submit(images), options.timeout_s)
        except QueueFull as exc:
            raise RequestError(503, f"busy: {exc}; retry", {"Retry-After": "1"}) from None
        except Stopped as exc:
            raise RequestError(503, str(exc), {"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within {options.timeout_s:g} s") from None
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    def model_named(model_name: str) -> None:
        if model_name != options.name:
            raise RequestError(404, f"no model named {model_name!r}; this server has {options.name!r}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return _page(options.name)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{model_name}")
    async def metadata(model_name: str):
        model_named(model_name)
        return {"name": options.name, "versions": ["1"], "platform": platform,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classifier.num_classes]}],
                "parameters": {"class_names": names, "preprocess": preprocess.to_dict(),
                               "max_batch_size": options.max_batch}}

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str):
        model_named(model_name)
        return JSONResponse({"name": options.name, "ready": state["ready"]},
                            status_code=200 if state["ready"] else 503)

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request):
        model_named(model_name)
        images, request_id = _tensor_request(await body(request), size)
        logits = await run(images)
        answer = {"model_name": options.name, "model_version": "1",
                  "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
                               "data": logits.reshape(-1).tolist()}]}
        if request_id is not None:
            answer["id"] = request_id
        return answer

    @app.post("/v1/classify")
    async def classify(request: Request, topk: int = 5):
        if not 1 <= topk <= MAX_TOPK:
            raise RequestError(400, f"topk must be 1 to {MAX_TOPK}")
        started = time.perf_counter()
        data = _image_bytes(await body(request), request.headers.get("content-type", ""))
        logits = await run(await asyncio.to_thread(prepared, data))  # decoding off the event loop
        probabilities = torch.softmax(torch.from_numpy(logits[0]).double(), dim=0)
        top = torch.topk(probabilities, min(topk, len(names)))
        return {"predictions": [{"class": names[i], "index": int(i), "probability": float(p)}
                                for p, i in zip(top.values.tolist(), top.indices.tolist())],
                "latency_ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _tensor_request(raw: bytes, size: int) -> tuple[np.ndarray, object]:
    """The images of an Open Inference Protocol request body, checked: FP32, shape (N, 3, size, size), finite."""
    try:
        request = json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, "the request must have exactly one input, named 'input'")
    tensor = inputs[0]
    if tensor.get("name") != "input":
        raise RequestError(400, f"unknown input {tensor.get('name')!r}; the model takes 'input'")
    if tensor.get("datatype") != "FP32":
        raise RequestError(400, f"input datatype must be FP32, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) for d in shape)
            or shape[0] < 1 or shape[1:] != [3, size, size]):
        raise RequestError(400, f"input shape must be [N, 3, {size}, {size}], got {shape}")
    try:
        data = np.asarray(tensor.get("data"), dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(400, "input data must be numbers") from None
    if data.size != int(np.prod(shape)):
        raise RequestError(400, f"input data has {data.size} values, shape {shape} needs {int(np.prod(shape))}")
    if not np.all(np.isfinite(data)):
        raise RequestError(400, "input data must be finite")
    return data.reshape(shape), request.get("id")


def _image_bytes(raw: bytes, content_type: str) -> bytes:
    """The image of a /v1/classify body: the body itself, or the first file part of a multipart form."""
    if not raw:
        raise RequestError(400, "empty body: send an image (raw bytes, or a multipart form with a file)")
    if not content_type.startswith("multipart/form-data"):
        return raw
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_filename() is not None or part.get_content_maintype() == "image":
            return part.get_payload(decode=True) or b""
    raise RequestError(400, "multipart form without a file part")
