#!/usr/bin/env python3
"""The seed's export entry (`python export.py --ckpt_file CKPT --file_format MINDIR`), mapped onto `mobilenetv2 export`.

    python scripts/export.py --ckpt_file CKPT [--file_format MINDIR|ONNX|AIR] [--file_name mobilenetv2]
        [--platform CPU|GPU|Ascend] [--batch_size 1] [--is_training_export False]

As the seed's default config (`is_training_export: False`), the exported graph ends in the Softmax: one output, the
probabilities; `--is_training_export True` exports the logits. It writes FILE_NAME.mindir (or .onnx) in the current
folder. AIR needs an Ascend device and is refused. MindSpore comes from this python or from
$MOBILENETV2_MINDSPORE_PYTHON (see `mobilenetv2 export --help`). Extra flags for `mobilenetv2 export` go in
$MOBILENETV2_ARGS.
"""
import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_file", required=True)
    parser.add_argument("--file_format", default="MINDIR", choices=["MINDIR", "ONNX", "AIR"])
    parser.add_argument("--file_name", default="mobilenetv2")
    parser.add_argument("--platform", default="CPU", choices=["CPU", "GPU", "Ascend"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--is_training_export", default="False", choices=["True", "False"])
    parser.add_argument("--device_id", type=int, default=0)  # the seed's; the export runs on the CPU
    args = parser.parse_args()
    if args.file_format == "AIR":
        print("export.py: AIR needs an Ascend device and its toolkit; export MINDIR or ONNX", file=sys.stderr)
        return 2
    python = HERE / ".venv" / "bin" / "python"
    suffix = {"MINDIR": "mindir", "ONNX": "onnx"}[args.file_format]
    command = [str(python) if python.is_file() else sys.executable, "-m", "mobilenetv2", "export", "--checkpoint",
               args.ckpt_file, "--format", suffix, "--output", f"{args.file_name}.{suffix}"]
    if args.is_training_export == "False":
        command.append("--with-softmax")
    if args.file_format == "ONNX":
        command += ["--batch-size", str(args.batch_size)]
    command += shlex.split(os.environ.get("MOBILENETV2_ARGS", ""))
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
