"""Load on `mobilenetv2 serve` over loopback: concurrency 1, 8 and 64 clients for a bounded time each, p50 / p99
latency and images/s, against the same runtime's offline throughput at the server's batch size, measured in the same
run; then the same load with a share of bad requests mixed in, which must give no 5xx.

Protocols (--protocols): `classify` posts real photos (scikit-image's, resized to the model's resize size, as PNG)
to /v1/classify, so a request costs what a browser user's costs: upload, decode, preprocess, a place in a batch.
`http-json`, `http-binary` and `grpc` send the same photos preprocessed on the client, through tritonclient as a
Triton user would: JSON numbers, binary tensor data (tritonclient's default) and gRPC raw tensors; their bad requests
are tritonclient's own request bodies made malformed (a byte short, a header length past the body, an output we do
not return). The server runs in its own process with the threads it is given; the clients share this process.

    python benchmarks/serve_load.py --checkpoint runs/demo/checkpoints/last.pt [--seconds 10] [--concurrency 1,8,64]
                                    [--max-batch 32] [--bad-fraction 0.1] [--threads 1]
                                    [--protocols classify,http-json,http-binary,grpc]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat")


def photo_bodies(size: int) -> list[bytes]:
    from PIL import Image
    from skimage import data

    bodies = []
    for name in PHOTOS:
        photo = getattr(data, name)()
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        buffer = io.BytesIO()
        Image.fromarray(photo).resize((size, size)).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies


BAD = [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b""]


def offline_rate(checkpoint: str, batch: int, seconds: float) -> float:
    """Images/s of the server's engine (ONNX Runtime through the cached export) on batches of `batch` tensors."""
    from mobilenetv2.deploy.predict import load_classifier

    classifier = load_classifier(checkpoint, runtime_name="onnx", batch_size=batch)
    size = classifier.preprocess.image_size
    images = torch.randn(batch, 3, size, size)
    for _ in range(3):
        classifier.forward(images)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.forward(images)
        count += batch
    return count / (time.perf_counter() - started)


def tensors(bodies: list[bytes], preprocess) -> list[np.ndarray]:
    """The photos as the model's input, preprocessed as the server would (what a tritonclient user sends)."""
    from PIL import Image

    from mobilenetv2.data.transforms import eval_transform

    transform = eval_transform(preprocess)
    return [transform(Image.open(io.BytesIO(body)).convert("RGB"))[None].numpy() for body in bodies]


def _post(connection, path: str, body: bytes, headers: dict) -> int:
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status


def _malformed_bodies(image: np.ndarray) -> list[tuple[bytes, dict]]:
    """tritonclient's own request for `image`, made malformed three ways (each must be a 4xx)."""
    import tritonclient.http as triton_http

    tensor = triton_http.InferInput("input", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    body, size = triton_http.InferenceServerClient.generate_request_body([tensor])
    header = json.loads(body[:size])
    wrong_output = json.dumps({**header, "outputs": [{"name": "probabilities"}]}).encode()
    return [(body[:-1], {"Inference-Header-Content-Length": str(size)}),
            (body, {"Inference-Header-Content-Length": str(len(body) + 1)}),
            (wrong_output + body[size:], {"Inference-Header-Content-Length": str(len(wrong_output))})]


def sender(protocol: str, ports: tuple[int, int], bodies: list[bytes], inputs: list[np.ndarray], seed: int):
    """One client's `send(bad) -> HTTP status` (gRPC codes mapped: INVALID_ARGUMENT 400, others 5xx) and `close`."""
    rng = np.random.default_rng(seed)
    port, grpc_port = ports
    state = {"connection": http.client.HTTPConnection("127.0.0.1", port, timeout=60)}

    def raw(path, body, headers):
        # a kept-alive connection the server closed while it sat idle is retried once on a new one, as HTTP client
        # libraries do; a second failure counts as an error
        for attempt in range(2):
            try:
                return _post(state["connection"], path, body, headers)
            except (OSError, http.client.HTTPException):
                state["connection"].close()
                state["connection"] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        return -1

    if protocol == "classify":
        def send(bad):
            body = BAD[rng.integers(len(BAD))] if bad else bodies[rng.integers(len(bodies))]
            return raw("/v1/classify", body, {"Content-Type": "image/png"})
        return send, lambda: state["connection"].close()
    from tritonclient.utils import InferenceServerException

    malformed = _malformed_bodies(inputs[0])
    if protocol == "grpc":
        import tritonclient.grpc as triton

        def connect():
            return triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    else:
        import tritonclient.http as triton

        def connect():
            return triton.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=60, network_timeout=60)
    state["client"] = connect()
    binary = protocol != "http-json"
    outputs = None if protocol == "grpc" else [triton.InferRequestedOutput("logits", binary_data=binary)]

    def send(bad):
        if bad and protocol != "grpc":
            return raw("/v2/models/mobilenetv2/infer", *malformed[rng.integers(len(malformed))])
        image = inputs[rng.integers(len(inputs))]
        tensor = triton.InferInput("input", list(image.shape), "FP32")
        if protocol == "grpc":
            tensor.set_data_from_numpy(image)
            if bad:  # two images declared, one sent
                tensor._input.shape[0] = 2
        else:
            tensor.set_data_from_numpy(image, binary_data=binary)
        for attempt in range(2):  # one retry on a new client after a dropped (idle, kept-alive) connection
            try:
                state["client"].infer("mobilenetv2", [tensor], outputs=outputs).as_numpy("logits")
                return 200
            except InferenceServerException as exc:
                code = str(exc.status())
                return 400 if "INVALID_ARGUMENT" in code else int(code) if code.isdigit() else 500
            except Exception:  # noqa: BLE001 - a dropped connection; a second one counts as an error
                state["client"].close()
                state["client"] = connect()
        return -1

    def close():
        state["connection"].close()
        state["client"].close()

    return send, close


def client(protocol: str, ports: tuple[int, int], bodies, inputs, bad_fraction: float, stop: float, seed: int,
           results: list) -> None:
    rng = np.random.default_rng(seed + 1000)
    send, close = sender(protocol, ports, bodies, inputs, seed)
    while time.perf_counter() < stop:
        bad = rng.random() < bad_fraction
        started = time.perf_counter()
        status = send(bad)
        results.append((bad, status, time.perf_counter() - started))
    close()


def load(protocol: str, ports: tuple[int, int], bodies: list[bytes], inputs: list[np.ndarray], concurrency: int,
         seconds: float, bad_fraction: float) -> dict:
    results: list = []
    stop = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(protocol, ports, bodies, inputs, bad_fraction, stop, seed,
                                                     results))
               for seed in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    good = [latency for bad, status, latency in results if not bad and status == 200]
    latencies = sorted(good) or [float("nan")]
    return {"protocol": protocol, "concurrency": concurrency, "requests": len(results), "images_per_s": len(good) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": sum(1 for bad, status, _ in results if not bad and status != 200),
            "bad_requests": sum(1 for bad, _, _ in results if bad),
            "server_errors": sum(1 for _, status, _ in results if status >= 500 or status < 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per concurrency")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="the server's inference threads")
    parser.add_argument("--protocols", default="classify,http-json,http-binary,grpc")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    from mobilenetv2.checkpoint import load_model
    from timing import cpu_line

    torch.set_num_threads(args.threads)
    print(cpu_line(f"server threads {args.threads}"), flush=True)
    preprocess = load_model(args.checkpoint).preprocess
    offline = offline_rate(args.checkpoint, args.max_batch, max(args.seconds / 2, 1.0))
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    port, grpc_port = ports
    protocols = args.protocols.split(",")
    server = subprocess.Popen([sys.executable, "-m", "mobilenetv2", "serve", "--checkpoint", args.checkpoint,
                               "--port", str(port), *(["--grpc-port", str(grpc_port)] if "grpc" in protocols else []),
                               "--max-batch", str(args.max_batch), "--max-delay-ms",
                               str(args.max_delay_ms), "--threads", str(args.threads)],
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    rows = []
    try:
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(0.2)
        bodies = photo_bodies(preprocess.resize_size)
        inputs = tensors(bodies, preprocess)
        print(f"offline ONNX Runtime at batch {args.max_batch}: {offline:,.0f} images/s")
        print("| protocol | concurrency | bad requests | images/s | vs offline | p50 ms | p99 ms | p99/p50 | errors | "
              "5xx |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        levels = [int(c) for c in args.concurrency.split(",")]
        plan = [(protocol, c, 0.0) for protocol in protocols for c in levels] + [
            (protocol, levels[-1], args.bad_fraction) for protocol in protocols]
        for protocol, concurrency, bad in plan:
            row = load(protocol, (port, grpc_port), bodies, inputs, concurrency, args.seconds, bad)
            row["offline_images_per_s"] = offline
            rows.append(row)
            print(f"| {protocol} | {concurrency} | {row['bad_requests']} ({bad:.0%}) | {row['images_per_s']:,.0f} | "
                  f"{row['images_per_s'] / offline:.0%} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                  f"{row['p99_ms'] / row['p50_ms']:.1f}x | {row['errors']} | {row['server_errors']} |", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
