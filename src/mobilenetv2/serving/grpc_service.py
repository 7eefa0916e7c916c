"""The Open Inference Protocol's gRPC service, `inference.GRPCInferenceService`, on `serve --grpc-port`: grpcio's
asyncio server on the REST app's event loop, so both share one dynamic batcher, one set of limits and one set of
statistics, and SIGTERM drains both. The service and message classes are those tritonclient ships (generated from
Triton's grpc_service.proto, BSD-3-Clause, which extends KServe's Open Inference Protocol proto, Apache-2.0); no
generated code lives in this package. Calls this server does not implement (shared memory, repository load and
unload, tracing, logging, streaming) answer UNIMPLEMENTED."""

from __future__ import annotations

from mobilenetv2.errors import UserError
from mobilenetv2.serving.protocol import EXTENSIONS, RequestError
from mobilenetv2.serving.statistics import Timing

# the HTTP status of a refusal, as the gRPC status code a client sees (names of grpc.StatusCode)
STATUS_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def require_grpc():
    """grpcio and the service's message classes, or one line saying which extra brings them."""
    try:
        import grpc
        from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
    except ImportError:
        raise UserError("--grpc-port needs grpcio and tritonclient's gRPC messages: pip install "
                        "'mobilenetv2[serve]'") from None
    return grpc, service_pb2, service_pb2_grpc, model_config_pb2


def _parameters(parameters) -> dict:
    """gRPC's InferParameter map as plain values, each of the type it was sent as (a classification sent as a string
    or a bool stays one, and is refused as REST refuses it)."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "int64_param")
            for key, value in parameters.items()}


def as_dict(request) -> tuple[dict, list[bytes]]:
    """A ModelInferRequest in the REST request's shape, parameters included (every output as raw bytes: gRPC answers
    in raw_output_contents), and its raw input contents."""
    inputs = []
    for tensor in request.inputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                 "parameters": _parameters(tensor.parameters)}
        field = TYPED_CONTENTS.get(tensor.datatype)
        if field is not None and tensor.HasField("contents"):
            entry["data"] = list(getattr(tensor.contents, field))
        inputs.append(entry)
    outputs = [{"name": output.name, "parameters": {**_parameters(output.parameters), "binary_data": True}}
               for output in request.outputs]
    converted = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    if outputs:
        converted["outputs"] = outputs
    if request.id:
        converted["id"] = request.id
    return converted, list(request.raw_input_contents)


async def start_grpc(options, info, state: dict, infer, statistics):
    """Start the service on options.grpc_host:options.grpc_port; `infer(request_dict, raw, timing)` is the REST
    app's own inference path. Returns the started grpc.aio server (stop it with `await server.stop(grace)`)."""
    grpc, messages, services, model_config = require_grpc()
    from google.protobuf import json_format

    async def refuse(context, status: int, message: str):
        await context.abort(getattr(grpc.StatusCode, STATUS_CODES.get(status, "INVALID_ARGUMENT")), message)

    async def named(context, name: str, version: str) -> None:
        if name != info.name:
            await refuse(context, 404, f"no model named {name!r}; this server has {info.name!r}")
        if version not in ("", info.version):
            await refuse(context, 404, f"model {name!r} has no version {version!r}; it has {info.version!r}")

    class Service(services.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return messages.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return messages.ServerReadyResponse(ready=state["ready"])

        async def ServerMetadata(self, request, context):
            from mobilenetv2 import __version__

            return messages.ServerMetadataResponse(name="mobilenetv2", version=__version__, extensions=EXTENSIONS)

        async def ModelReady(self, request, context):
            await named(context, request.name, request.version)
            return messages.ModelReadyResponse(ready=state["ready"])

        async def ModelMetadata(self, request, context):
            await named(context, request.name, request.version)
            record = info.metadata()
            tensor = messages.ModelMetadataResponse.TensorMetadata
            return messages.ModelMetadataResponse(
                name=record["name"], versions=record["versions"], platform=record["platform"],
                inputs=[tensor(**t) for t in record["inputs"]], outputs=[tensor(**t) for t in record["outputs"]])

        async def ModelConfig(self, request, context):
            await named(context, request.name, request.version)
            return messages.ModelConfigResponse(config=json_format.ParseDict(info.config(),
                                                                              model_config.ModelConfig()))

        async def ModelStatistics(self, request, context):
            if request.name:
                await named(context, request.name, request.version)
            return json_format.ParseDict({"model_stats": [statistics.to_dict()]},
                                         messages.ModelStatisticsResponse())

        async def RepositoryIndex(self, request, context):
            entry = messages.RepositoryIndexResponse.ModelIndex
            return messages.RepositoryIndexResponse(models=[entry(
                name=info.name, version=info.version, state="READY" if state["ready"] else "UNAVAILABLE")])

        async def ModelInfer(self, request, context):
            timing = Timing()
            await named(context, request.model_name, request.model_version)
            converted, raw = as_dict(request)
            try:
                answer, buffers = await infer(converted, raw, timing)
            except RequestError as exc:
                await refuse(context, exc.status, str(exc))
            output = messages.ModelInferResponse.InferOutputTensor
            return messages.ModelInferResponse(
                model_name=answer["model_name"], model_version=answer["model_version"], id=answer.get("id", ""),
                outputs=[output(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in answer["outputs"]],
                raw_output_contents=buffers)

    limit = int(options.max_body_mb * (1 << 20))
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 64 << 20)],
                             maximum_concurrent_rpcs=options.max_connections)
    services.add_GRPCInferenceServiceServicer_to_server(Service(), server)
    if server.add_insecure_port(f"{options.grpc_host}:{options.grpc_port}") == 0:
        raise OSError(f"cannot listen for gRPC on {options.grpc_host}:{options.grpc_port}")
    await server.start()
    return server
