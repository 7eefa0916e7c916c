"""A longer fuzz run of every model-file reader than CI's: mutated and random bytes given to what `eval` and
`predict` do with a model file (read, build, run once). Each case must give a model or one UserError line, within
`--seconds-per-case`, under an address-space limit (a header that makes us allocate what the file does not hold
fails the run). Prints a table: cases per format, models, clear errors, failures (with the first few).

    PYTHONPATH=src python tools/fuzz_readers.py [--cases 2000] [--memory-gib 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MS_FIXTURE = ROOT / "tests" / "fixtures" / "ms_mobilenetv2_w0.5_c10.ckpt"


def originals(folder: Path) -> dict[str, bytes]:
    from mobilenetv2 import MobileNetV2, save_model
    from mobilenetv2.deploy.export import export

    model = MobileNetV2(num_classes=3, width_mult=0.25, class_names=["a", "b", "c"]).eval()
    save_model(model, folder / "model.pt")
    save_model(model, folder / "model.safetensors")
    export(model, "onnx", folder / "model.onnx", batch_size=1, dynamic_batch=True, onnx_exporter="auto")  # any valid file
    return {"pt": (folder / "model.pt").read_bytes(), "safetensors": (folder / "model.safetensors").read_bytes(),
            "ckpt": MS_FIXTURE.read_bytes(), "onnx": (folder / "model.onnx").read_bytes()}


def mutate(original: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # truncated
        return original[: rng.randrange(len(original) + 1)]
    if kind == 1:  # a few bytes flipped
        data = bytearray(original)
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        return bytes(data)
    if kind == 2:  # a random run spliced in
        at, run = rng.randrange(len(original)), bytes(rng.randrange(256) for _ in range(rng.randint(1, 256)))
        return original[:at] + run + original[at + len(run):]
    if kind == 3:  # a block duplicated or removed
        at, length = rng.randrange(len(original)), rng.randint(1, 4096)
        return original[:at] + original[at:at + length] * 2 + original[at + length:] if rng.random() < 0.5 \
            else original[:at] + original[at + length:]
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 4096)))  # random bytes


def open_any(path: Path, runtime_name: str = "auto") -> None:
    """Read, build and run once, as `eval` and `predict` do. `auto` also exports a readable mutant to ONNX and times
    both engines (seconds per valid mutant); `torch` checks the readers alone."""
    from mobilenetv2.deploy.predict import load_classifier

    classifier = load_classifier(path, runtime_name=runtime_name)
    size = classifier.preprocess.image_size
    classifier.forward(torch.zeros(1, 3, size, size))


class Timeout(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds-per-case", type=float, default=10.0)
    parser.add_argument("--memory-gib", type=float, default=6.0, help="address-space limit for the whole run")
    args = parser.parse_args()
    from mobilenetv2.errors import UserError

    torch.set_num_threads(1)
    limit = int(args.memory_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def alarm(_signum, _frame):
        raise Timeout

    signal.signal(signal.SIGALRM, alarm)
    rng = random.Random(args.seed)
    failures: list[str] = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = originals(folder)
        for suffix, original in sources.items():
            counts = {"model": 0, "error": 0, "failure": 0}
            start = time.perf_counter()
            for case in range(args.cases):
                path = folder / f"case.{suffix}"
                path.write_bytes(mutate(original, rng))
                signal.setitimer(signal.ITIMER_REAL, args.seconds_per_case)
                try:
                    open_any(path)
                    counts["model"] += 1
                except UserError as exc:
                    ok = str(exc) and "\n" not in str(exc)
                    counts["error" if ok else "failure"] += 1
                    if not ok:
                        failures.append(f"{suffix} case {case}: multi-line message {str(exc)[:200]!r}")
                except (Timeout, MemoryError, Exception) as exc:  # noqa: BLE001 - what the run looks for
                    counts["failure"] += 1
                    failures.append(f"{suffix} case {case}: {type(exc).__name__}: "
                                    f"{traceback.format_exception_only(exc)[-1].strip()[:200]}")
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            rows.append((suffix, args.cases, counts, time.perf_counter() - start))
    print("| format | cases | models | one-line errors | failures | seconds |")
    print("|---|---|---|---|---|---|")
    for suffix, cases, counts, seconds in rows:
        print(f"| {suffix} | {cases} | {counts['model']} | {counts['error']} | {counts['failure']} | {seconds:.0f} |")
    for line in failures[:20]:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
