"""The documentation stays true: the site builds with --strict, its command-line reference lists every flag that
`train --help` prints, and the fenced examples of the README and of every page under docs/ run.

An example is a ```bash or ```python block (```text, ```yaml and the like are shown, not run). It runs as written in
a folder holding `photos/` (an ImageFolder tree of real photos at odd sizes: 3 classes, train/ and val/),
`photos-more/` (the same classes and one more), `photo.jpg` and the repository's `configs/`, one page at a time, its
blocks in order (a page's later examples use what its earlier ones wrote). Three things keep it small: `train` runs one
epoch (`--epochs 1` after the page's flags) with no loader workers, and a `train` command that an earlier page ran
as written, on the shared folders alone, is not trained again: the page gets a copy of what it wrote (four pages
start from the same command). Each `mobilenetv2 ...` line runs in this process (torch imported once); any other
program in a block needs the block marked, in the page source, on the line before its fence:
`<!-- example: not run here: WHY -->` (GPUs, downloads, servers that run until stopped, ...) or
`<!-- example: run by tests/PATH -->` (a test that runs it in the setting it needs).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import real_photos

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = re.compile(r"^<!-- example: (not run here: .+|run by (tests/\S+)) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
EXAMPLE_LANGUAGES = {"bash", "python"}


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    mark: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with the example mark on the line before its fence, if any."""
    found, lines, index = [], page.read_text().splitlines(), 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        start, body = index, []
        index += 1
        while index < len(lines) and lines[index] != "```":
            body.append(lines[index])
            index += 1
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        mark = MARK.match(previous.strip())
        found.append(Block(page, start + 1, opened.group(1), "\n".join(body) + "\n", mark.group(1) if mark else None))
        index += 1
    return found


def examples() -> list[Block]:
    return [block for page in PAGES for block in blocks(page) if block.language in EXAMPLE_LANGUAGES]


def commands(code: str) -> list[list[str]]:
    """A shell block's commands: continuation lines joined, comments dropped, one argv per command."""
    joined = code.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def write_photos(root: Path, classes: list[str], per_class: dict[str, int], seed: int) -> None:
    """Crops of real photos at odd sizes (JPEG and PNG), as a user's folder would hold them."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    for split, count in per_class.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            photo = photos[name]
            h, w = photo.shape[:2]
            for i in range(count):
                ch, cw = int(h * rng.uniform(0.35, 0.8)), int(w * rng.uniform(0.35, 0.8))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = Image.fromarray(photo[y:y + ch, x:x + cw])
                crop = crop.resize((max(cw // 3, 33), max(ch // 3, 29)))
                crop.save(folder / (f"{i:02d}.png" if i % 3 == 2 else f"{i:02d}.jpg"))


@pytest.fixture(scope="module")
def materials(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs-materials")
    classes = ["astronaut", "chelsea", "coffee"]
    write_photos(root / "photos", classes, {"train": 4, "val": 2}, seed=0)
    write_photos(root / "photos-more", [*classes, "rocket"], {"train": 4, "val": 2}, seed=1)
    Image.fromarray(real_photos()["chelsea"]).save(root / "photo.jpg", quality=90)
    return root


def reads_shared_folders_only(argv: list[str], shared: tuple[Path, ...]) -> bool:
    """Every path the command names, its --output aside, is in one of the `shared` folders (through the links)."""
    named = [Path(arg).resolve() for i, arg in enumerate(argv)
             if (i == 0 or argv[i - 1] != "--output") and Path(arg).exists()]
    return all(any(root in path.parents for root in shared) for path in named)


def run_command(argv: list[str], where: str, materials: Path) -> None:
    """`argv` as written in the current folder. A folder beside `materials` keeps a copy of what each `train` on the
    shared folders alone (`materials` and configs/) wrote, taken as it ended, for the next page that runs it."""
    from mobilenetv2.cli import main

    if argv[:3] == ["python", "-m", "mobilenetv2"]:
        argv = ["mobilenetv2", *argv[3:]]
    assert argv[0] == "mobilenetv2", f"{where}: runs {argv[0]!r}; mark the block (see tests/test_docs.py)"
    argv = argv[1:]
    copy = None
    if argv[0] == "train":
        argv = [*argv, "--epochs", "1", "--workers", "0"]
        if "--output" in argv and reads_shared_folders_only(argv[1:], (materials, ROOT / "configs")):
            output = Path(argv[argv.index("--output") + 1])
            trained = materials.parent / f"{materials.name}-trained"
            copy = trained / hashlib.sha256(shlex.join(argv).encode()).hexdigest()[:16]
            if copy.is_dir():
                shutil.copytree(copy, output, symlinks=True)
                return
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None), f"{where}: `mobilenetv2 {shlex.join(argv)}` exited {code}: {stderr.getvalue()[-2000:]}"
    if copy is not None:
        shutil.copytree(output, copy, symlinks=True)


def run_block(block: Block, materials: Path) -> None:
    if block.language == "python":
        exec(compile(block.code, block.where, "exec"), {"__name__": "__example__"})  # noqa: S102 - our own docs
        return
    for argv in commands(block.code):
        run_command(argv, block.where, materials)


PAGES_WITH_EXAMPLES = sorted({block.page for block in examples()})


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_examples_of_a_page_run_as_written(page, materials, tmp_path, monkeypatch):
    for item in materials.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for block in blocks(page):
        if block.language not in EXAMPLE_LANGUAGES or block.mark:
            continue
        run_block(block, materials)


def test_every_example_runs_here_or_says_why_not():
    runnable = [block for block in examples() if block.mark is None]
    elsewhere = [block for block in examples() if block.mark and block.mark.startswith("run by ")]
    for block in elsewhere:
        test_file = ROOT / block.mark.removeprefix("run by ").split("::")[0]
        assert test_file.is_file(), f"{block.where}: {block.mark} names no test file"
        assert block.page.name in test_file.read_text(), f"{block.where}: {test_file.name} does not read this page"
    for block in runnable:
        if block.language == "bash":
            for argv in commands(block.code):
                assert argv[0] == "mobilenetv2" or argv[:3] == ["python", "-m", "mobilenetv2"], (
                    f"{block.where}: runs {argv[0]!r}, which this suite cannot run as written; mark the block")
    assert len(runnable) >= 12  # the examples that cannot run here stay the exception (GPUs, downloads, servers)


def test_the_site_builds_strict_and_its_cli_reference_lists_every_train_flag(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    help_text = subprocess.run([sys.executable, "-m", "mobilenetv2", "train", "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "120"}, timeout=120).stdout
    printed = set(re.findall(r"^\s{2}(--[a-z][a-z0-9-]*)", help_text, re.M))
    assert {"--data", "--lr-scaling", "--progressive-resize", "--teacher"} <= printed and len(printed) > 70
    for group in ("data:", "model:", "schedule:", "distillation:"):
        assert f"\n{group}" in help_text
    page = (site / "reference" / "cli" / "index.html").read_text()
    train = page[page.index('id="mobilenetv2-train"'):page.index('id="mobilenetv2-convert"')]
    listed = set(re.findall(r"(--[a-z][a-z0-9-]*)", train))
    assert printed <= listed, sorted(printed - listed)
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert "lr_reference_batch" in config_page and "progressive_ramp" in config_page
    api = (site / "reference" / "api" / "index.html").read_text()
    for documented in ("mobilenetv2.model.MobileNetV2", "mobilenetv2.checkpoint.load_model",
                       "mobilenetv2.training.run.run_training"):
        assert f'id="{documented}"' in api, documented  # mkdocstrings rendered the docstring
    assert "fonts.googleapis" not in (site / "index.html").read_text()  # the site fetches nothing from elsewhere


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link  # every page it points to exists (the site's build checks its own)
