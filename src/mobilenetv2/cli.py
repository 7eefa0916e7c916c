"""The `mobilenetv2` command: subcommands mapped onto the package's functions, no logic of its own.

Errors a user can cause end in one line on stderr and exit code 2; the library names arguments in backticks
(`batch_size`), which this module shows as the flags that set them (--batch-size). torch is imported only by the
commands that need it, so `--help` and a wrong flag answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing

from mobilenetv2 import __version__
from mobilenetv2.config import TrainConfig
from mobilenetv2.deploy.formats import FORMATS as EXPORT_FORMATS
from mobilenetv2.deploy.formats import default_output, require_format
from mobilenetv2.errors import TrainingStopped, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per config field; defaults are suppressed so we can tell which flags were given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f"{f.metadata.get('help', '')} (default: {f.default!r})", "default": argparse.SUPPRESS}
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=hints[f.name], metavar=f.name.upper(), **kwargs)


def _cmd_convert(args) -> int:
    from mobilenetv2.checkpoint import load_state_into, read_weights, save_model

    loaded = read_weights(args.source)
    model = loaded.build()
    load_state_into(model, loaded)
    if args.class_names:
        names = _read_class_names(args.class_names)
        if len(names) != model.num_classes:
            raise UserError(f"{args.class_names} has {len(names)} class names; the model has {model.num_classes} classes")
        model.class_names = names
    save_model(model, args.output)
    if loaded.ignored:
        print(f"ignored {len(loaded.ignored)} non-weight entries: {', '.join(sorted(loaded.ignored)[:8])}"
              + (" ..." if len(loaded.ignored) > 8 else ""))
    print(f"converted {loaded.source_format} checkpoint {args.source} (width {loaded.width_mult}, "
          f"{loaded.num_classes} classes) -> {args.output}")
    return 0


def _read_class_names(path: str) -> list[str]:
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise UserError(f"class names file not found: {path}")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _cmd_train(args) -> int:
    from mobilenetv2.config import build_config
    from mobilenetv2.training.run import run_training

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "config")}
    recipe = build_config(TrainConfig, args.config, notify=False)
    if "batch_size" in overrides and "lr_reference_batch" not in overrides:
        overrides["lr_reference_batch"] = recipe.lr_reference_batch or recipe.batch_size  # what the rates are for
    run_training(build_config(TrainConfig, args.config, overrides))
    return 0


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from mobilenetv2 import runtime
    from mobilenetv2.deploy import predict

    if args.batch_size < 1:
        raise UserError("`batch_size` must be >= 1")
    if bool(args.checkpoint) == bool(args.compare):
        raise UserError("give `checkpoint` (evaluate one model) or `compare` A B (per-image agreement of two)")
    folder = predict.eval_folder(args.data)
    if args.compare:
        print(predict.compare_models(*args.compare, folder, batch_size=args.batch_size, workers=args.workers,
                                     runtime_name=args.runtime))
        return 0
    device = "cpu" if args.device == "auto" and args.runtime in ("onnx", "openvino") else args.device
    with runtime.session(device, "off") as state:
        result, classes, classifier = predict.evaluate_checkpoint(
            args.checkpoint, folder, state, batch_size=args.batch_size, workers=args.workers, resize_mode=args.resize,
            runtime_name=args.runtime, data_backend=args.data_backend)
    if state.is_main:
        print(f"result:{{'acc': {result.top1}, 'top5': {result.top5}}} ckpt={args.checkpoint} "
              f"runtime={classifier.runtime}")
        print(f"evaluated {result.count} images" + (f", skipped {result.skipped} unreadable" if result.skipped else ""))
        if args.json:
            report = {"checkpoint": str(args.checkpoint), "data": str(folder), "runtime": classifier.runtime,
                      "data_backend": args.data_backend, **result.to_dict(classes)}
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_predict(args) -> int:
    import json

    from mobilenetv2.deploy import predict

    if args.topk < 1:
        raise UserError("`topk` must be >= 1")
    classifier = predict.load_classifier(args.checkpoint, runtime_name=args.runtime, batch_size=len(args.images))
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
    model = load_model(args.checkpoint)
    output = args.output or default_output(args.checkpoint, args.format)
    try:
        options = {"onnx_exporter": args.onnx_exporter} if args.format == "onnx" else {}
        if args.format == "executorch" and args.int8:
            from mobilenetv2.deploy.quantize import calibration_from

            options = {"int8": True, "calibration": calibration_from(model, args.data, args.calibration_images)}
        reports = export(model, args.format, output, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                         with_softmax=args.with_softmax, **options)
    except ExportCheckError as exc:
        print(f"mobilenetv2 export: check failed: {exc}", file=sys.stderr)
        return 1
    for line in reports:
        print(line)
    print(f"wrote {output}")
    return 0


def _cmd_quantize(args) -> int:
    from mobilenetv2.checkpoint import load_model
    from mobilenetv2.deploy.quantize import quantize

    output = args.output or args.checkpoint.rsplit(".", 1)[0] + ".int8.onnx"
    report = quantize(load_model(args.checkpoint), args.data, output, calibration_images=args.calibration_images,
                      batch_size=args.batch_size, workers=args.workers, keep_fp32=args.keep_fp32)
    print(f"fp32 top-1 {report.fp32_top1:.4f}, int8 top-1 {report.int8_top1:.4f}, drop {report.drop_points:.2f} "
          f"points ({report.evaluated} val images, {report.calibration_images} calibration images)")
    if report.images_per_s:
        print(f"--keep-fp32 {report.keep_fp32}: the faster here (images/s at batch 32: " +
              ", ".join(f"{name} {rate:,.0f}" for name, rate in report.images_per_s.items()) +
              f"; CPU: {report.timed_on}); another CPU may favour the other layout: time it there with `bench`")
    print(f"wrote {output}")
    return 0


def _cmd_bench(args) -> int:
    import json

    from mobilenetv2.checkpoint import load_model
    from mobilenetv2.deploy.bench import as_dicts, bench, default_runtimes, parse_list, table

    rows = bench(load_model(args.checkpoint), parse_list(args.formats or default_runtimes(), str, "formats"),
                 parse_list(args.batch_sizes, int, "batch_sizes"), seconds=args.seconds, int8=args.int8)
    print(json.dumps(as_dicts(rows), indent=2) if args.json else table(rows))
    return 0


def _cmd_data(args) -> int:
    if args.name == "synthetic":
        from mobilenetv2.data.synthetic import write_synthetic

        out = write_synthetic(args.output, images=args.images, size=args.size)
        print(f"synthetic JPEG ImageFolder ({args.images} images, about {args.size}) ready in {out}")
        return 0
    from mobilenetv2.data.fashion_mnist import write_fashion_mnist

    out = write_fashion_mnist(args.output, per_class=args.per_class, val_per_class=args.val_per_class,
                              source=args.source, download=args.download)
    print(f"Fashion-MNIST ImageFolder ready in {out}")
    return 0


def _cmd_demo(args) -> int:
    from pathlib import Path

    from mobilenetv2.demo import DemoOptions, run_demo

    options = DemoOptions(output=Path(args.output), config=Path(args.config), data=Path(args.data), quick=args.quick,
                          per_class=args.per_class, val_per_class=args.val_per_class, device=args.device)
    summary = run_demo(options)
    print(f"demo: top-1 {summary['top1']:.2%} on {summary['count']} test images, ONNX top-1 {summary['onnx_top1']:.2%}, "
          f"{summary['seconds']['total']:.0f} s in all; report in {options.output / 'report.md'}")
    return 0


def _cmd_plot(args) -> int:
    from mobilenetv2.monitor import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0


RUNTIME_HELP = ("auto: on a CPU the fastest engine installed, timed here (a .pt runs through an ONNX export cached "
                "beside it), on a GPU torch; torch | onnx (ONNX Runtime) | openvino")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mobilenetv2", description="Train, fine-tune, evaluate, export and serve MobileNetV2.")
    parser.add_argument("--version", action="version", version=f"mobilenetv2 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train from scratch, fine-tune, or continue training")
    train.add_argument("--config", metavar="FILE.yaml", help="recipe file; flags override its values")
    _add_dataclass_options(train, TrainConfig)
    # before --weight-decay-on: still read (as all / weights), with a notice
    train.add_argument("--decay-bn-bias", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    train.set_defaults(handler=_cmd_train)

    convert = commands.add_parser("convert", help="convert MindSpore / torchvision / timm weights to our .pt")
    convert.add_argument("source", help="a .ckpt (MindSpore), .pth/.pt (torchvision, timm, ours) or .safetensors")
    convert.add_argument("--output", "-o", required=True, help="destination .pt or .safetensors")
    convert.add_argument("--class-names", help="text file with one class name per line, stored in the output")
    convert.set_defaults(handler=_cmd_convert)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (or .onnx) on a folder; prints the seed's result line")
    evaluate.add_argument("--data", required=True, help="dataset root (uses val/ or validation_preprocess/) or a class-folder root")
    evaluate.add_argument("--checkpoint", help="any format load_model reads, or an exported .onnx")
    evaluate.add_argument("--compare", nargs=2, metavar=("A", "B"), help="per-image top-1 agreement of two models")
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.add_argument("--json", metavar="FILE", help="write top-1/top-5, loss, count, per-class accuracy, confusion matrix")
    evaluate.add_argument("--resize", choices=["short", "squash"], help="short: shorter side then centre crop "
                          "(torchvision/timm); squash: square resize as the seed (default: the checkpoint's)")
    evaluate.add_argument("--runtime", default="auto", help=RUNTIME_HELP)
    evaluate.add_argument("--data-backend", default="pil", help="pil: decode in the loader's workers; device: "
                          "workers read bytes, the device decodes each batch (nvJPEG on a GPU), as in training")
    evaluate.set_defaults(handler=_cmd_eval)

    predict = commands.add_parser("predict", help="classify images: class names and probabilities")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--runtime", default="auto", help=RUNTIME_HELP)
    predict.set_defaults(handler=_cmd_predict)

    export = commands.add_parser("export", help="export to ONNX / TorchScript / MindSpore, checked against eager")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--format", required=True, help="; ".join(f"{name}: {fmt.description}"
                                                                   for name, fmt in EXPORT_FORMATS.items()))
    export.add_argument("--output", "-o", help="output file (default: next to the checkpoint)")
    export.add_argument("--batch-size", type=int, default=1)
    export.add_argument("--dynamic-batch", action="store_true", help="any batch size at run time")
    export.add_argument("--with-softmax", action="store_true", help="also output probabilities ('probs')")
    export.add_argument("--int8", action="store_true", help="executorch: int8 through the PT2E quantizer")
    export.add_argument("--data", help="with --int8: dataset root whose train/ images calibrate")
    export.add_argument("--calibration-images", type=int, default=512)
    export.add_argument("--onnx-exporter", choices=["dynamo", "legacy"], default="dynamo",
                        help="dynamo: torch's current exporter (opset 18); legacy: the deprecated TorchScript-based one")
    export.set_defaults(handler=_cmd_export)

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
    bench_.add_argument("--formats", help="torch, onnx, onnx-int8, openvino, openvino-int8, executorch (default: "
                        "every CPU engine installed here but executorch)")
    bench_.add_argument("--batch-sizes", default="1,32")
    bench_.add_argument("--int8", help="an int8 .onnx from `quantize` (default: quantized here, photos calibrate)")
    bench_.add_argument("--seconds", type=float, default=3.0, help="timed seconds per runtime and batch size")
    bench_.add_argument("--json", action="store_true")
    bench_.set_defaults(handler=_cmd_bench)

    data = commands.add_parser("data", help="write a real dataset as an ImageFolder tree")
    data.add_argument("name", choices=["fashion-mnist", "synthetic"],
                      help="fashion-mnist: Debian's Fashion-MNIST; synthetic: ImageNet-like JPEGs from scikit-image's "
                           "photos, for benchmarks")
    data.add_argument("output", help="folder to write train/ and val/ into")
    data.add_argument("--per-class", type=int, help="train images per class (default: all)")
    data.add_argument("--val-per-class", type=int, help="val images per class (default: all)")
    data.add_argument("--source", help="folder with the *-ubyte.gz files (default /usr/share/datasets/fashion-mnist)")
    data.add_argument("--download", action="store_true", help="download with torchvision when the files are missing")
    data.add_argument("--images", type=int, default=1000, help="synthetic: how many JPEGs (a tenth go to val/)")
    data.add_argument("--size", default="500x375", help="synthetic: typical width x height, varied by +-20 %%")
    data.set_defaults(handler=_cmd_data)

    demo = commands.add_parser("demo", help="the main job on Fashion-MNIST: train, evaluate, export, predict, report")
    demo.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny settings)")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--config", default="configs/fashion_mnist.yaml", help="the recipe")
    demo.add_argument("--data", default="data/fashion-mnist", help="where the ImageFolder tree is written once")
    demo.add_argument("--per-class", type=int, help="train images per class (default: all 6,000)")
    demo.add_argument("--val-per-class", type=int, help="test images per class (default: all 1,000)")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(handler=_cmd_demo)

    plot = commands.add_parser("plot", help="draw loss, accuracy and learning-rate curves of a run")
    plot.add_argument("run_dir")
    plot.add_argument("--output", help="PNG path (default RUN_DIR/curves.png)")
    plot.set_defaults(handler=_cmd_plot)
    return parser


def as_flags(message: str) -> str:
    """A library message with its `argument_names` shown as the --flags that set them."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda match: "--" + match.group(1).replace("_", "-"), message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"mobilenetv2 {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"mobilenetv2 {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mobilenetv2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
