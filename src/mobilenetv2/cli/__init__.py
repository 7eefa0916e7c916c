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
from mobilenetv2.cli.deploy import add_deploy_commands
from mobilenetv2.cli.groups import TRAIN_GROUPS
from mobilenetv2.cli.serve import add_serve_command
from mobilenetv2.config import TrainConfig
from mobilenetv2.errors import TrainingStopped, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip=(), groups=()) -> None:
    """One flag per config field; defaults are suppressed so we can tell which flags were given. With `groups`
    ((title, description, field names), ...) the flags are listed under those titles, in that order."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    sections = [(parser.add_argument_group(title, description), names) for title, description, names in groups]
    placed = {name for _, names in sections for name in names}
    order = [(section, fields[name]) for section, names in sections for name in names if name in fields]
    order += [(parser, f) for name, f in fields.items() if name not in placed]
    for target, f in order:
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f"{f.metadata.get('help', '')} (default: {f.default!r})", "default": argparse.SUPPRESS}
        if hints[f.name] is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            target.add_argument(flag, type=hints[f.name], metavar=f.name.upper(), **kwargs)


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


def _cmd_data(args) -> int:
    wanted = 2 if args.name == "shard" else 1
    if len(args.paths) != wanted:
        raise UserError(f"data {args.name} takes {'SRC OUT' if wanted == 2 else 'OUT'}, got {' '.join(args.paths)}")
    args.output = args.paths[-1]
    if args.name == "shard":
        from mobilenetv2.data.shards import parse_size, write_shards

        report = write_shards(args.paths[0], args.output, parse_size(args.shard_size), args.workers)
        for split, names in report.shards.items():
            skipped = report.skipped[split]
            print(f"{split}: {report.samples[split]} samples in {len(names)} shard(s)"
                  + (f", skipped {len(skipped)} unreadable ({', '.join(skipped[:3])})" if skipped else ""))
        print(f"shards and {args.output}/_info.json written")
        return 0
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mobilenetv2", description="Train, fine-tune, evaluate, export and serve MobileNetV2.")
    parser.add_argument("--version", action="version", version=f"mobilenetv2 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train from scratch, fine-tune, or continue training")
    train.add_argument("--config", metavar="FILE.yaml", help="recipe file; flags override its values")
    _add_dataclass_options(train, TrainConfig, groups=TRAIN_GROUPS)
    # before --weight-decay-on: still read (as all / weights), with a notice
    train.add_argument("--decay-bn-bias", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    train.set_defaults(handler=_cmd_train)

    convert = commands.add_parser("convert", help="convert MindSpore / torchvision / timm weights to our .pt")
    convert.add_argument("source", help="a .ckpt (MindSpore), .pth/.pt (torchvision, timm, ours) or .safetensors")
    convert.add_argument("--output", "-o", required=True, help="destination .pt or .safetensors")
    convert.add_argument("--class-names", help="text file with one class name per line, stored in the output")
    convert.set_defaults(handler=_cmd_convert)
    add_deploy_commands(commands)
    add_serve_command(commands)

    data = commands.add_parser("data", help="write a real dataset as an ImageFolder tree, or shard a tree")
    data.add_argument("name", choices=["fashion-mnist", "synthetic", "shard"],
                      help="fashion-mnist: Debian's Fashion-MNIST; synthetic: ImageNet-like JPEGs from scikit-image's "
                           "photos, for benchmarks; shard: an ImageFolder tree SRC as WebDataset tar shards in OUT")
    data.add_argument("paths", nargs="+", metavar="PATH", help="OUT, the folder to write train/ and val/ into; "
                      "for shard: SRC OUT")
    data.add_argument("--shard-size", default="256MB", help="shard: bytes per shard (256MB, 1GB, ...)")
    data.add_argument("--workers", type=int, default=4, help="shard: files read and checked at once")
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
