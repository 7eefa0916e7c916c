"""The HTTP app (FastAPI on uvicorn: the `serve` extra): KServe's Open Inference Protocol v2 (server and model
metadata and health, versioned and unversioned paths, tensor inference with Triton's binary tensor data and
classification extensions, model statistics, configuration and the repository index), `/v1/classify` for an image,
Prometheus metrics and the web page; and, on `--grpc-port`, the protocol's gRPC service (serving/grpc_service.py).
Every request to the model goes through one DynamicBatcher. Bad input of any kind is a 4xx with a JSON body
`{"error": ...}`; it never reaches the model."""

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
from mobilenetv2.serving.protocol import (EXTENSIONS, ModelInfo, ProtocolError, RequestError, byte_count,
                                          decode_request, encode_outputs, inflated, split_body)
from mobilenetv2.serving.statistics import Statistics, Timing

DRAIN_FACTOR = 2  # an over-long body is read and dropped up to this many times --max-body-mb before the 413
MAX_TOPK = 100
JSON_OFF_LOOP = 1 << 16  # bytes of JSON above which it is parsed in a worker thread


@dataclass(frozen=True)
class ServeOptions:
    name: str = "mobilenetv2"
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images waiting; beyond it requests get 503 with Retry-After
    timeout_s: float = 30.0  # per request, queue and model together
    max_body_mb: float = 16.0  # a request's body (decompressed, when it comes gzip- or deflate-encoded)
    grpc_port: int | None = None  # the gRPC service, off unless given
    grpc_host: str = "127.0.0.1"
    max_connections: int = 1024  # concurrent gRPC calls beyond it are refused (RESOURCE_EXHAUSTED)
    body_timeout_s: float = 30.0  # a request's body must arrive within it (408 otherwise)


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
    names = classifier.class_names or [str(i) for i in range(classifier.num_classes)]
    info = ModelInfo(options.name, platform, preprocess.image_size, list(names), preprocess.to_dict(),
                     options.max_batch, options.max_delay_ms)
    statistics = Statistics(options.name, info.version)
    transform = eval_transform(preprocess)

    def prepared(data: bytes) -> np.ndarray:
        """An image file's bytes as the model's (1, 3, size, size) input, decoded within MAX_PIXELS."""
        try:
            return transform(decode_rgb(io.BytesIO(data), preprocess.upright))[None].numpy()
        except DECODE_ERRORS as exc:
            raise RequestError(415, f"not a readable image ({exc.__class__.__name__}: {str(exc)[:120]})") from None

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(classifier.forward(torch.from_numpy(images)).float().cpu().numpy(), dtype=np.float32)

    def observe(batch: int, queued: int) -> None:
        metric["batch"].observe(batch)
        metric["queue"].set(queued)

    batcher = DynamicBatcher(forward, options.max_batch, options.max_delay_ms / 1000, options.max_queue, observe,
                             statistics.batch)
    state = {"ready": False}

    async def run(images: np.ndarray, timing: Timing | None = None) -> np.ndarray:
        try:
            return await asyncio.wait_for(batcher.submit(images, timing), options.timeout_s)
        except QueueFull as exc:
            raise RequestError(503, f"busy: {exc}; retry", {"Retry-After": "1"}) from None
        except Stopped as exc:
            raise RequestError(503, str(exc), {"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within {options.timeout_s:g} s") from None
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    async def infer_tensors(request: dict, binary, timing: Timing) -> tuple[dict, list[bytes]]:
        """One Open Inference Protocol request, REST or gRPC: its response's JSON part and binary buffers. A tensor
        sent as JSON numbers is converted off the event loop (150,528 of them for one 224-px image)."""
        ok = False
        try:
            started = time.perf_counter_ns()
            try:
                inputs = request.get("inputs")
                text_input = isinstance(inputs, list) and any(isinstance(t, dict) and t.get("data") is not None
                                                              for t in inputs)
                decoded = (await asyncio.to_thread(decode_request, request, binary, info) if text_input
                           else decode_request(request, binary, info))
            except ProtocolError as exc:
                raise RequestError(exc.status, str(exc)) from None
            timing.input_ns = time.perf_counter_ns() - started
            logits = await run(decoded.images, timing)
            if not np.isfinite(logits).all():  # finite inputs can still overflow inside the network
                raise RequestError(400, "the network's output is not finite for these inputs (values too large for "
                                        "float32 arithmetic); the answer would be NaN")
            started = time.perf_counter_ns()
            outputs, buffers = encode_outputs(logits, decoded.outputs, info.class_names)
            answer = {"model_name": info.name, "model_version": info.version, "outputs": outputs}
            if decoded.id is not None:
                answer["id"] = decoded.id
            timing.output_ns = time.perf_counter_ns() - started
            ok = True
            return answer, buffers
        finally:
            statistics.request(timing, ok)

    async def lifespan(_app):
        grpc_server = None
        batcher.start()
        if options.grpc_port is not None:
            from mobilenetv2.serving.grpc_service import start_grpc

            grpc_server = await start_grpc(options, info, state, infer_tensors, statistics)
        state["ready"] = True
        yield
        state["ready"] = False
        if grpc_server is not None:
            await grpc_server.stop(grace=5.0)  # calls in flight finish; new ones are refused
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

    limit = int(options.max_body_mb * (1 << 20))

    async def body(request: Request) -> bytes:
        """The request's body, at most --max-body-mb. A longer one is answered 413 after reading (and dropping) up
        to DRAIN_FACTOR times the limit: a client still sending when the server closed would see its connection
        reset instead of the answer. Past that, the answer goes out at once and the connection closes unread."""
        declared = byte_count(request.headers.get("content-length"))
        declared_over = declared is not None and declared > limit
        too_long = RequestError(413, f"body{f' of {declared} bytes' if declared_over else ''} is over --max-body-mb "
                                     f"{options.max_body_mb:g}")
        if declared_over and declared > DRAIN_FACTOR * limit:
            raise too_long
        chunks = []

        async def read() -> int:
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > DRAIN_FACTOR * limit:
                    break
                if total <= limit:
                    chunks.append(chunk)
            return total

        try:  # a body sent ten bytes at a time must not hold a connection for as long as the client likes
            total = await asyncio.wait_for(read(), options.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the body did not arrive within --body-timeout-s {options.body_timeout_s:g}",
                               {"Connection": "close"}) from None
        if declared_over or total > limit:
            raise too_long
        return inflated(b"".join(chunks), request.headers.get("content-encoding", "identity"), limit,
                        options.max_body_mb)

    def model_named(model_name: str, version: str | None = None) -> None:
        if model_name != options.name:
            raise RequestError(404, f"no model named {model_name!r}; this server has {options.name!r}")
        if version is not None and version != info.version:
            raise RequestError(404, f"model {model_name!r} has no version {version!r}; it has {info.version!r}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return _page(options.name)

    @app.get("/v2")
    async def server_metadata():
        from mobilenetv2 import __version__

        return {"name": "mobilenetv2", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/stats")  # before /v2/models/{model_name}, which would take "stats" for a name
    @app.get("/v2/models/{model_name}/stats")
    @app.get("/v2/models/{model_name}/versions/{version}/stats")
    async def stats(model_name: str | None = None, version: str | None = None):
        if model_name is not None:
            model_named(model_name, version)
        return {"model_stats": [statistics.to_dict()]}

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def metadata(model_name: str, version: str | None = None):
        model_named(model_name, version)
        return info.metadata()

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_ready(model_name: str, version: str | None = None):
        model_named(model_name, version)
        return JSONResponse({"name": options.name, "ready": state["ready"]},
                            status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{model_name}/config")
    @app.get("/v2/models/{model_name}/versions/{version}/config")
    async def config(model_name: str, version: str | None = None):
        model_named(model_name, version)
        return info.config()

    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": options.name, "version": info.version, "state": "READY" if state["ready"] else "UNAVAILABLE"}]

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer(model_name: str, request: Request, version: str | None = None):
        timing = Timing()
        model_named(model_name, version)
        try:
            raw, header_length = await body(request), request.headers.get("inference-header-content-length")
            # a large JSON header (a tensor as text) is parsed off the event loop, which keeps answering meanwhile
            json_size = byte_count(header_length) or len(raw)
            if min(json_size, len(raw)) > JSON_OFF_LOOP:
                header, binary = await asyncio.to_thread(split_body, raw, header_length)
            else:
                header, binary = split_body(raw, header_length)
        except ProtocolError as exc:
            statistics.request(timing, False)
            raise RequestError(exc.status, str(exc)) from None
        answer, buffers = await infer_tensors(header, binary, timing)
        if not buffers:
            return JSONResponse(answer)
        head = json.dumps(answer, separators=(",", ":")).encode()
        return Response(b"".join([head, *buffers]), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    @app.post("/v1/classify")
    async def classify(request: Request, topk: int = 5):
        if not 1 <= topk <= MAX_TOPK:
            raise RequestError(400, f"topk must be 1 to {MAX_TOPK}")
        started = time.perf_counter()
        data = await _image_bytes(await body(request), request.headers.get("content-type", ""))
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


FORM_FILES, FORM_FIELDS = 1, 16  # what a /v1/classify form may hold: one image and a few fields


async def _image_bytes(raw: bytes, content_type: str) -> bytes:
    """The image of a /v1/classify body: the body itself, or the file of a multipart form, parsed by Starlette's
    form parser (python-multipart) in a worker thread, within FORM_FILES files and FORM_FIELDS fields: a form of a
    hundred thousand empty parts is refused at its seventeenth, and the event loop answers meanwhile."""
    if not raw:
        raise RequestError(400, "empty body: send an image (raw bytes, or a multipart form with a file)")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":  # media types ignore case (RFC 9110)
        return raw
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        yield raw

    async def image() -> bytes:
        parser = MultiPartParser(Headers({"content-type": content_type}), chunks(), max_files=FORM_FILES,
                                 max_fields=FORM_FIELDS, max_part_size=len(raw))
        form = await parser.parse()
        try:
            upload = next((value for _key, value in form.multi_items() if isinstance(value, UploadFile)), None)
            return await upload.read() if upload is not None else b""
        finally:
            await form.close()

    try:
        data = await asyncio.to_thread(asyncio.run, image())
    except MultiPartException as exc:
        raise RequestError(400, f"malformed or oversized multipart form: {exc}") from None
    if not data:
        raise RequestError(400, "multipart form without a file part")
    return data
