"""MkDocs hook of the documentation site: a page line `<!-- generated: cli -->` or `<!-- generated: config -->`
becomes the reference generated from the argparse parsers or TrainConfig at build time, so it cannot drift."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mobilenetv2.cli.reference import cli_markdown, config_markdown  # noqa: E402

GENERATED = {"<!-- generated: cli -->": cli_markdown, "<!-- generated: config -->": config_markdown}


def on_page_markdown(markdown: str, **_) -> str:
    for marker, generate in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
