"""The `mobilenetv2` command: subcommands mapped onto the package's functions, no logic of its own.

Errors a user can cause end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from mobilenetv2.errors import UserError


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
    from mobilenetv2.checkpoint import read_weights, save_model
    from mobilenetv2.model import MobileNetV2
    from mobilenetv2.checkpoint import load_state_into

    loaded = read_weights(args.source)
    model = MobileNetV2(num_classes=loaded.num_classes, width_mult=loaded.width_mult)
    load_state_into(model, loaded)
    class_names = _read_class_names(args.class_names) if args.class_names else loaded.class_names
    save_model(model, args.output, class_names=class_names, preprocess=loaded.preprocess)
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
    from mobilenetv2.config import TrainConfig, build_config
    from mobilenetv2.train import run_training

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "config")}
    config = build_config(TrainConfig, args.config, overrides)
    run_training(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mobilenetv2 import __version__
    from mobilenetv2.config import TrainConfig

    parser = _Parser(prog="mobilenetv2", description="Train, fine-tune, evaluate, export and serve MobileNetV2.")
    parser.add_argument("--version", action="version", version=f"mobilenetv2 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train from scratch, fine-tune, or continue training")
    train.add_argument("--config", metavar="FILE.yaml", help="recipe file; flags override its values")
    _add_dataclass_options(train, TrainConfig)
    train.set_defaults(handler=_cmd_train)

    convert = commands.add_parser("convert", help="convert MindSpore / torchvision / timm weights to our .pt")
    convert.add_argument("source", help="a .ckpt (MindSpore), .pth/.pt (torchvision, timm, ours) or .safetensors")
    convert.add_argument("--output", "-o", required=True, help="destination .pt or .safetensors")
    convert.add_argument("--class-names", help="text file with one class name per line, stored in the output")
    convert.set_defaults(handler=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"mobilenetv2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilenetv2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
