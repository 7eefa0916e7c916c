"""The commands that use a trained model: `eval`, `predict`, `export`, `quantize`, `bench` (handlers and flags)."""

from __future__ import annotations

import sys

from mobilenetv2.deploy.formats import FORMATS as EXPORT_FORMATS
from mobilenetv2.deploy.formats import default_output, require_format
from mobilenetv2.errors import UserError
from mobilenetv2.preprocess import EXIF_MODES

EXIF_HELP = ("apply: photos turned upright by their EXIF orientation, as viewers show them; ignore: pixels as stored "
             "(the seed's); default: the checkpoint's (apply for checkpoints that do not say)")
RUNTIME_HELP = ("auto: on a CPU the faster of torch and ONNX Runtime, timed here (a .pt runs through an ONNX export "
                "cached beside it), on a GPU torch; torch | onnx (ONNX Runtime) | openvino")


PRECISION_HELP = ("auto | f32 | bf16: what float layers compute in. auto and f32: f32 on every engine (the "
                  "contract); bf16: OpenVINO's bf16 (CPUs with bf16 units; faster, logits within about 1 %% of their "
                  "scale: `bench` shows its speed and top-1 agreement)")


def precision_note(classifier) -> str:
    """` precision=X` before the runtime, for OpenVINO (whose own default differs between CPUs)."""
    return f" precision={classifier.precision}" if classifier.runtime == "openvino" else ""


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from mobilenetv2 import runtime
    from mobilenetv2.deploy import predict

    if args.batch_size < 1:
        raise UserError("`batch_size` must be >= 1")
    if bool(args.checkpoint) == bool(args.compare):
        raise UserError("give `checkpoint` (evaluate one model) or `compare` A B (per-image agreement of two)")
    folder = predict.eval_folder(args.data, args.shard_info, args.skip_bad_shards)
    if args.compare and isinstance(folder, predict.ShardEval):
        raise UserError("`compare` reads an image folder; evaluate each model on the shards instead")
    if args.compare:
        print(predict.compare_models(*args.compare, folder, batch_size=args.batch_size, workers=args.workers,
                                     runtime_name=args.runtime))
        return 0
    on_cpu = args.runtime in ("onnx", "openvino") or args.precision == "bf16"  # engines of the CPU
    device = "cpu" if args.device == "auto" and on_cpu else args.device
    with runtime.session(device, "off") as state:
        result, classes, classifier = predict.evaluate_checkpoint(
            args.checkpoint, folder, state, batch_size=args.batch_size, workers=args.workers, resize_mode=args.resize,
            runtime_name=args.runtime, data_backend=args.data_backend, tta=args.tta, exif=args.exif,
            precision=args.precision)
    if state.is_main:
        print(f"result:{{'acc': {result.top1}, 'top5': {result.top5}}} ckpt={args.checkpoint}"
              f"{precision_note(classifier)} runtime={classifier.runtime}"
              + (f" tta={args.tta}" if args.tta != "none" else ""))
        print(f"evaluated {result.count} images" + (f", skipped {result.skipped} unreadable" if result.skipped else ""))
        if args.json:
            report = {"checkpoint": str(args.checkpoint), "data": str(folder), "runtime": classifier.runtime,
                      "precision": classifier.precision,
                      "data_backend": args.data_backend, "tta": args.tta, **result.to_dict(classes)}
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_predict(args) -> int:
    import dataclasses
    import json

    from mobilenetv2.deploy import predict

    if args.topk < 1:
        raise UserError("`topk` must be >= 1")
    classifier = predict.load_classifier(args.checkpoint, runtime_name=args.runtime, batch_size=len(args.images),
                                         precision=args.precision)
    if classifier.precision != "f32":  # faster and looser than the contract: said where it cannot be mistaken
        print(f"mobilenetv2 predict: runtime {classifier.runtime}, {classifier.precision} compute", file=sys.stderr)
    if args.exif:
        classifier.preprocess = dataclasses.replace(classifier.preprocess, exif=args.exif)
    results = predict.predict(classifier, args.images, args.topk, skip_unreadable=True)
    failed = [result for result in results if "error" in result]
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"mobilenetv2 predict: error: {result['error']}", file=sys.stderr)
        elif not args.json:
            print(result["image"])
            for item in result["predictions"]:
                print(f"  {item['probability']:7.2%}  {item['class']}")
    return 2 if failed else 0


def _cmd_export(args) -> int:
    from mobilenetv2.checkpoint import load_model
    from mobilenetv2.deploy.export import ExportCheckError, export

    require_format(args.format)  # before the checkpoint is read; export() checks the batch size
    if args.format == "mindir":  # no MindSpore anywhere: said before any work
        from mobilenetv2.deploy.mindir import mindspore_python

        mindspore_python(args.mindspore_python)
    model = load_model(args.checkpoint)
    output = args.output or default_output(args.checkpoint, args.format)
    try:
        options = {"onnx_exporter": args.onnx_exporter} if args.format in ("onnx", "triton") else {}
        if args.int8 and args.format not in ("executorch", "tflite"):
            raise UserError(f"--int8 is for executorch and tflite, not {args.format} (int8 ONNX: mobilenetv2 quantize)")
        if args.int8:
            from mobilenetv2.data.folders import find_splits
            from mobilenetv2.deploy.quantize import calibration_from

            options = {"int8": True, "calibration": calibration_from(model, args.data, args.calibration_images)}
            if args.format == "tflite":
                options["val"] = find_splits(args.data).val
        options.update({"layout": args.layout} if args.format == "tflite" else {})
        options.update({"precision": args.precision} if args.format in ("openvino", "coreml") else {})
        options.update({"python": args.mindspore_python} if args.format == "mindir" else {})
        batch_size = args.batch_size or (32 if args.format == "triton" else 1)  # triton: its max_batch_size
        reports = export(model, args.format, output, batch_size=batch_size, dynamic_batch=args.dynamic_batch,
                         with_softmax=args.with_softmax, **options)
    except ExportCheckError as exc:
        print(f"mobilenetv2 export: check failed: {exc}", file=sys.stderr)
        return 1
    for line in reports:
        print(line)
    print(f"wrote {output}")
    return 0


def _cmd_average(args) -> int:
    from mobilenetv2 import runtime
    from mobilenetv2.deploy import predict
    from mobilenetv2.deploy.average import average, last_checkpoints

    if bool(args.checkpoints) == bool(args.last):
        raise UserError("give the checkpoints to average, or `last` N RUN_DIR")
    paths = last_checkpoints(args.last[1], _positive_int(args.last[0], "last")) if args.last else args.checkpoints
    average(paths, args.output)
    print(f"averaged {len(paths)} checkpoints: {', '.join(str(p) for p in paths)}")
    print(f"wrote {args.output}")
    if args.data:
        with runtime.session("cpu", "off") as state:
            result, _classes, classifier = predict.evaluate_checkpoint(
                args.output, predict.eval_folder(args.data), state, workers=args.workers, runtime_name="torch")
        print(f"result:{{'acc': {result.top1}, 'top5': {result.top5}}} ckpt={args.output} runtime={classifier.runtime}")
    return 0


def _positive_int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"`{name}` must be a whole number, got {text!r}") from None


def _cmd_quantize(args) -> int:
    from mobilenetv2.checkpoint import load_model
    from mobilenetv2.deploy.quantize import quantize, speed_note

    output = args.output or args.checkpoint.rsplit(".", 1)[0] + ".int8.onnx"
    report = quantize(load_model(args.checkpoint), args.data, output, calibration_images=args.calibration_images,
                      batch_size=args.batch_size, workers=args.workers, keep_fp32=args.keep_fp32)
    print(f"fp32 top-1 {report.fp32_top1:.4f}, int8 top-1 {report.int8_top1:.4f}, drop {report.drop_points:.2f} "
          f"points ({report.evaluated} val images, {report.calibration_images} calibration images)")
    if report.images_per_s:
        print(f"--keep-fp32 {report.keep_fp32}: the faster here (images/s at batch 32: " +
              ", ".join(f"{name} {rate:,.0f}" for name, rate in report.images_per_s.items()) +
              f"; CPU: {report.timed_on}); another CPU may favour the other layout: time it there with `bench`")
    note = speed_note(report.images_per_s)
    if note:
        print(note)
    print(f"wrote {output}")
    return 0


def _cmd_bench(args) -> int:
    import json

    from mobilenetv2.checkpoint import load_model
    from mobilenetv2.deploy.bench import as_dicts, bench, default_runtimes, parse_list, table

    rows = bench(load_model(args.checkpoint), parse_list(args.formats or default_runtimes(), str, "formats"),
                 parse_list(args.batch_sizes, int, "batch_sizes"), seconds=args.seconds, int8=args.int8,
                 pte=args.pte, tflite=args.tflite)
    print(json.dumps(as_dicts(rows), indent=2) if args.json else table(rows))
    return 0


def add_deploy_commands(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (or .onnx) on a folder; prints the seed's result line")
    evaluated = evaluate.add_argument_group("what is evaluated")
    evaluating = evaluate.add_argument_group("how")
    reported = evaluate.add_argument_group("output")
    evaluated.add_argument("--data", required=True, help="dataset root (uses val/ or validation_preprocess/), a "
                           "class-folder root, or shards (a folder or URL with _info.json, a brace pattern, pipe:)")
    evaluated.add_argument("--shard-info", default="", help="the shards' manifest, when --data has none beside it")
    evaluated.add_argument("--skip-bad-shards", action="store_true", help="go on without shards that cannot be read")
    evaluated.add_argument("--checkpoint", help="any format load_model reads, or an exported .onnx")
    evaluated.add_argument("--compare", nargs=2, metavar=("A", "B"), help="per-image top-1 agreement of two models")
    evaluating.add_argument("--batch-size", type=int, default=100)
    evaluating.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    evaluating.add_argument("--workers", type=int, default=2)
    reported.add_argument("--json", metavar="FILE", help="write top-1/top-5, loss, count, per-class accuracy, "
                          "confusion matrix")
    evaluating.add_argument("--resize", choices=["short", "squash"], help="short: shorter side then centre crop "
                            "(torchvision/timm); squash: square resize as the seed (default: the checkpoint's)")
    evaluating.add_argument("--runtime", default="auto", help=RUNTIME_HELP)
    evaluating.add_argument("--exif", choices=EXIF_MODES, help=EXIF_HELP)
    evaluating.add_argument("--precision", default="auto", help=PRECISION_HELP)
    evaluating.add_argument("--data-backend", default="pil", help="pil: decode in the loader's workers; device: "
                            "workers read bytes, the device decodes each batch (nvJPEG on a GPU), as in training")
    evaluating.add_argument("--tta", default="none", help="test-time augmentation, logits averaged over the views: "
                            "none | flip (the image and its mirror) | flip-crops (four corner crops and the centre "
                            "crop of the resized image, and their mirrors)")
    evaluate.set_defaults(handler=_cmd_eval)

    predict = commands.add_parser("predict", help="classify images: class names and probabilities")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--runtime", default="auto", help=RUNTIME_HELP)
    predict.add_argument("--exif", choices=EXIF_MODES, help=EXIF_HELP)
    predict.add_argument("--precision", default="auto", help=PRECISION_HELP)
    predict.set_defaults(handler=_cmd_predict)

    export = commands.add_parser("export", help="export to ONNX, TorchScript, MindSpore (.ckpt, MINDIR), ExecuTorch, "
                                 "LiteRT, OpenVINO, Core ML, torchvision, timm or Triton, each checked in its runtime")
    exported = export.add_argument_group("what is written")
    shaped = export.add_argument_group("the graph", "inputs, outputs and precision")
    quantized = export.add_argument_group("int8", "executorch and tflite")
    foreign = export.add_argument_group("MindSpore")
    exported.add_argument("--checkpoint", required=True)
    exported.add_argument("--format", required=True, help="; ".join(f"{name}: {fmt.description}"
                                                                     for name, fmt in EXPORT_FORMATS.items()))
    exported.add_argument("--output", "-o", help="output file (default: next to the checkpoint)")
    shaped.add_argument("--batch-size", type=int, help="the exported batch (default 1); triton: max_batch_size "
                        "(default 32)")
    shaped.add_argument("--dynamic-batch", action="store_true", help="any batch size at run time")
    shaped.add_argument("--with-softmax", action="store_true", help="also output probabilities ('probs')")
    quantized.add_argument("--int8", action="store_true", help="executorch and tflite: static int8 through the PT2E "
                           "quantizer (int8 ONNX: mobilenetv2 quantize)")
    quantized.add_argument("--data", help="with --int8: dataset root whose train/ images calibrate (tflite: its val/ "
                           "top-1 before and after is measured and kept in the file)")
    shaped.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw", help="tflite: the input's layout, "
                        "N x 3 x H x W as exported or N x H x W x 3 as an Android bitmap's pixels")
    shaped.add_argument("--precision", choices=["auto", "fp32", "fp16"], default="auto", help="openvino (default "
                        "fp32) and coreml (default fp16, what the Neural Engine runs) weights")
    foreign.add_argument("--mindspore-python", help="mindir: the python of an environment with mindspore (default "
                         "$MOBILENETV2_MINDSPORE_PYTHON, else this one's mindspore)")
    quantized.add_argument("--calibration-images", type=int, default=512)
    shaped.add_argument("--onnx-exporter", choices=["dynamo", "legacy", "auto"], default="dynamo",
                        help="onnx and triton: dynamo, torch's current exporter (opset 18); legacy, the deprecated "
                        "TorchScript-based one (opset 17, ten times faster to export); auto: legacy while torch has it")
    export.set_defaults(handler=_cmd_export)

    average = commands.add_parser("average", help="the mean of several checkpoints of one network (EMA weights too)")
    average.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="any format load_model reads")
    average.add_argument("--last", nargs=2, metavar=("N", "RUN_DIR"), help="the N newest numbered checkpoints of a run")
    average.add_argument("--output", "-o", required=True, help="destination .pt or .safetensors")
    average.add_argument("--data", help="dataset root: evaluate the average on its val/")
    average.add_argument("--workers", type=int, default=2)
    average.set_defaults(handler=_cmd_average)

    quantize = commands.add_parser("quantize", help="int8 ONNX (static, per-channel), top-1 before and after")
    quantize.add_argument("--checkpoint", required=True)
    quantize.add_argument("--data", required=True, help="dataset root: train/ calibrates, val/ measures")
    quantize.add_argument("--calibration-images", type=int, default=512)
    quantize.add_argument("--output", "-o", help="output file (default: CHECKPOINT.int8.onnx)")
    quantize.add_argument("--batch-size", type=int, default=100)
    quantize.add_argument("--workers", type=int, default=2)
    quantize.add_argument("--keep-fp32", choices=["auto", "stem", "none"], default="auto",
                          help="leading layers left in fp32: stem and first block, none, or the faster here (auto)")
    quantize.set_defaults(handler=_cmd_quantize)

    bench_ = commands.add_parser("bench", help="latency and throughput per runtime on this machine, one table")
    bench_.add_argument("--checkpoint", required=True)
    bench_.add_argument("--formats", help="torch, onnx, onnx-int8, openvino, openvino-bf16, openvino-int8, "
                        "executorch, litert, litert-int8 (default: every CPU engine installed here, openvino-bf16 "
                        "where the CPU has bf16 units, but the phones' executorch and litert)")
    bench_.add_argument("--batch-sizes", default="1,32")
    bench_.add_argument("--int8", help="an int8 .onnx from `quantize` (default: quantized here, photos calibrate)")
    bench_.add_argument("--pte", help="the executorch row's program, from `export --format executorch` of this "
                        "checkpoint (default: exported here)")
    bench_.add_argument("--tflite", help="the litert (or, int8, litert-int8) row's file, from `export --format tflite` "
                        "of this checkpoint (default: converted here); checked against it first")
    bench_.add_argument("--seconds", type=float, default=3.0, help="timed seconds per runtime and batch size")
    bench_.add_argument("--json", action="store_true")
    bench_.set_defaults(handler=_cmd_bench)
