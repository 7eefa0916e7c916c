"""A Triton Inference Server model repository entry: `NAME/config.pbtxt` (the ONNX Runtime backend, dynamic
batching, the class names as Triton's label file) and `NAME/1/model.onnx` (our checked ONNX export with a dynamic
batch). The config is built as Triton's own `ModelConfig` message (tritonclient's `model_config_pb2`) and written
by protobuf's text format; it is parsed back with the same schema and its fields compared with the model's before
the folder is put in place."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mobilenetv2.engines.onnx_files import ExportCheckError
from mobilenetv2.errors import UserError
from mobilenetv2.model import MobileNetV2


def model_config_schema():
    """tritonclient's `model_config_pb2`, loaded from its file: the package's own `grpc/__init__` needs grpcio,
    the schema needs only protobuf."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("`format` triton checks its config with Triton's schema: pip install 'mobilenetv2[triton]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    loader_spec = importlib.util.spec_from_file_location("mobilenetv2_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def config_message(name: str, model: MobileNetV2, max_batch: int, labels: bool):
    """Triton's ModelConfig for the entry: the ONNX Runtime backend, dynamic batching, CPU instances."""
    schema = model_config_schema()
    config = schema.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch)
    size, fp32 = model.preprocess.image_size, schema.DataType.Value("TYPE_FP32")
    config.input.add(name="input", data_type=fp32, dims=[3, size, size])
    config.output.add(name="logits", data_type=fp32, dims=[model.num_classes],
                      label_filename="labels.txt" if labels else "")
    config.dynamic_batching.SetInParent()  # present and empty: Triton's defaults
    config.instance_group.add(kind=schema.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    return config


def config_text(name: str, model: MobileNetV2, max_batch: int, labels: bool) -> str:
    """config.pbtxt: `config_message` written by protobuf's text format (quoting and escaping are protobuf's)."""
    from google.protobuf import text_format

    return text_format.MessageToString(config_message(name, model, max_batch, labels))


def check_config(text: str, name: str, model: MobileNetV2, max_batch: int) -> list[str]:
    """Parse `text` as Triton's ModelConfig and compare every field we set; raises ExportCheckError."""
    from google.protobuf import text_format

    schema = model_config_schema()
    config = schema.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ExportCheckError(f"Triton's schema refuses config.pbtxt: {exc}") from None
    size, fp32 = model.preprocess.image_size, schema.DataType.Value("TYPE_FP32")
    problems = [what for ok, what in [
        (config.name == name, "name"), (config.platform == "onnxruntime_onnx", "platform"),
        (config.max_batch_size == max_batch, "max_batch_size"),
        (len(config.input) == 1 and config.input[0].name == "input" and config.input[0].data_type == fp32
         and list(config.input[0].dims) == [3, size, size], "input"),
        (len(config.output) == 1 and config.output[0].name == "logits" and config.output[0].data_type == fp32
         and list(config.output[0].dims) == [model.num_classes], "output"),
        (config.HasField("dynamic_batching"), "dynamic_batching")] if not ok]
    if problems:
        raise ExportCheckError(f"config.pbtxt parsed by Triton's schema differs in {', '.join(problems)}")
    return [f"config.pbtxt parsed with Triton's ModelConfig schema: onnxruntime_onnx, max_batch_size {max_batch}, "
            f"input [3, {size}, {size}], output [{model.num_classes}], dynamic batching"]


def write_entry(model: MobileNetV2, temp: Path, export_onnx, *, batch_size: int = 32, onnx_exporter: str = "dynamo",
                name: str | None = None, **_options) -> list[str]:
    """Write the repository entry into the folder `temp` (renamed into place by `deploy.export.export`), its ONNX
    model through `export_onnx` (deploy.export's checked writer); the model's name in Triton is `name`."""
    schema_ok = model_config_schema()  # refuse before anything is written when the schema is missing
    del schema_ok
    temp.unlink(missing_ok=True)  # the name export() reserved becomes the folder
    version = temp / "1"
    version.mkdir(parents=True)
    reports = export_onnx(model, version / "model.onnx", batch_size=1, dynamic_batch=True,
                          onnx_exporter=onnx_exporter)
    labels = model.class_names is not None
    if labels:
        (temp / "labels.txt").write_text("".join(f"{label}\n" for label in model.class_names))
    text = config_text(name, model, batch_size, labels)
    (temp / "config.pbtxt").write_text(text)
    return reports + check_config(text, name, model, batch_size)
