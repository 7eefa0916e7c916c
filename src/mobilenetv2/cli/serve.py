"""`mobilenetv2 serve`: a model over HTTP (serving/app.py) on uvicorn."""

from __future__ import annotations

from mobilenetv2.cli.deploy import EXIF_HELP, PRECISION_HELP
from mobilenetv2.errors import UserError
from mobilenetv2.preprocess import EXIF_MODES

SERVE_RUNTIMES = ("onnx", "onnx-int8", "openvino", "torch")
PLATFORMS = {"onnx": "onnxruntime_onnx", "openvino": "openvino", "torch": "pytorch_eager"}  # Triton's names


def _cmd_serve(args) -> int:
    import dataclasses
    import signal

    import torch

    try:
        import uvicorn

        from mobilenetv2.serving.app import ServeOptions, create_app
        from mobilenetv2.serving.connections import deadline_protocol
    except ImportError:
        raise UserError("serve needs its extra: pip install 'mobilenetv2[serve]'") from None
    from mobilenetv2.deploy import predict

    if args.runtime not in SERVE_RUNTIMES:
        raise UserError(f"`runtime` must be one of {', '.join(SERVE_RUNTIMES)}, got {args.runtime!r}")
    checks = [(args.max_batch >= 1, "`max_batch` must be >= 1"), (args.max_delay_ms >= 0, "`max_delay_ms` must be >= 0"),
              (args.max_queue >= args.max_batch, "`max_queue` must be >= `max_batch`"),
              (args.max_body_mb > 0, "`max_body_mb` must be > 0"), (args.timeout_s > 0, "`timeout_s` must be > 0"),
              (min(args.header_timeout_s, args.idle_timeout_s, args.body_timeout_s) > 0,
               "`header_timeout_s`, `idle_timeout_s` and `body_timeout_s` must be > 0"),
              (0 <= args.port < 65536, "`port` must be 0 to 65535"), (args.threads >= 0, "`threads` must be >= 0"),
              (args.grpc_port is None or 0 < args.grpc_port < 65536, "`grpc_port` must be 1 to 65535"),
              (args.grpc_port != args.port, "`grpc_port` must differ from `port`")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if args.grpc_port is not None:
        from mobilenetv2.serving.grpc_service import require_grpc

        require_grpc()
    if args.runtime == "onnx-int8" and not _quantized(args.checkpoint):
        raise UserError("`runtime` onnx-int8 serves an int8 .onnx: make one with `mobilenetv2 quantize`")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = "onnx" if args.runtime.startswith("onnx") else args.runtime
    classifier = predict.load_classifier(args.checkpoint, runtime_name=engine, batch_size=args.max_batch,
                                         precision=args.precision)
    if args.exif:
        classifier.preprocess = dataclasses.replace(classifier.preprocess, exif=args.exif)
    platform = PLATFORMS[classifier.runtime]
    options = ServeOptions(name=args.name, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                           max_queue=args.max_queue, timeout_s=args.timeout_s, max_body_mb=args.max_body_mb,
                           grpc_port=args.grpc_port, grpc_host=args.host, max_connections=args.max_connections,
                           body_timeout_s=args.body_timeout_s)
    app = create_app(classifier, options, platform)
    grpc = f" and grpc://{args.host}:{args.grpc_port}" if args.grpc_port is not None else ""
    print(f"serving {args.checkpoint} as {args.name!r} ({classifier.runtime}, {classifier.precision} compute) on "
          f"http://{args.host}:{args.port}{grpc}", flush=True)
    # SIGTERM: uvicorn stops accepting, lets requests in flight finish, then the app drains its batcher. uvicorn
    # re-raises the signal to the handler it found; this one makes that drained stop an exit 0, not a kill
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=8,
                    limit_concurrency=args.max_connections, http=deadline_protocol(args.header_timeout_s),
                    timeout_keep_alive=args.idle_timeout_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _quantized(checkpoint: str) -> bool:
    """Whether `checkpoint` is an .onnx that `quantize` wrote (its metadata record says how it was quantized)."""
    from pathlib import Path

    from mobilenetv2.engines.onnx_files import read_onnx_metadata

    if not checkpoint.endswith(".onnx"):
        return False
    record = read_onnx_metadata(Path(checkpoint))[1]
    return isinstance(record, dict) and bool(record.get("quantization"))


def add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="an HTTP (and gRPC) server: Open Inference Protocol v2 with Triton's "
                                              "binary tensors, /v1/classify, metrics, a web page; dynamic batching")
    served = serve.add_argument_group("the model")
    network = serve.add_argument_group("network")
    batching = serve.add_argument_group("batching and limits")
    served.add_argument("--checkpoint", required=True, help="any model file we read, or an exported (int8) .onnx")
    served.add_argument("--runtime", default="onnx", help="onnx (ONNX Runtime; a .pt through its checked, cached "
                        "export) | onnx-int8 (an int8 .onnx from quantize) | openvino (a .pt, .onnx or .xml) | torch")
    served.add_argument("--precision", default="auto", help=PRECISION_HELP)
    served.add_argument("--exif", choices=EXIF_MODES, help=EXIF_HELP)
    served.add_argument("--name", default="mobilenetv2", help="the model's name in /v2/models/NAME")
    network.add_argument("--host", default="127.0.0.1")
    network.add_argument("--port", type=int, default=8000)
    network.add_argument("--grpc-port", type=int, default=None, help="also serve the Open Inference Protocol's gRPC "
                         "service on this port (off unless given; Triton's default is 8001)")
    batching.add_argument("--max-batch", type=int, default=32, help="most images per model call")
    batching.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    batching.add_argument("--max-queue", type=int, default=256, help="images waiting before requests get 503")
    batching.add_argument("--timeout-s", type=float, default=30.0, help="per request, queue and model together")
    batching.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body")
    network.add_argument("--max-connections", type=int, default=1024, help="open connections before 503")
    network.add_argument("--header-timeout-s", type=float, default=10.0, help="a connection's request head must be "
                         "complete within this of opening or of its last answer, else it is closed (idle and "
                         "slow clients never hold the connection limit)")
    network.add_argument("--idle-timeout-s", type=float, default=5.0, help="a kept-alive connection idle this long "
                         "after an answer is closed")
    network.add_argument("--body-timeout-s", type=float, default=30.0, help="a request's body must arrive within "
                         "this (408 otherwise)")
    served.add_argument("--threads", type=int, default=0, help="inference threads (0: torch's default)")
    serve.set_defaults(handler=_cmd_serve)
