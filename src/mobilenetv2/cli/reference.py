"""The documentation site's reference pages, generated from the code itself: the command line from the argparse
parsers, the config keys from TrainConfig. The site's build hook calls these, so the reference cannot drift from
what `--help` prints. No torch import.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from mobilenetv2.cli.groups import TRAIN_GROUPS
from mobilenetv2.config import TrainConfig


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _option_row(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
        return None
    if action.option_strings:
        names = list(action.option_strings)
        if isinstance(action, argparse.BooleanOptionalAction):
            names = [n for n in names if not n.startswith("--no-")]
            shown = " / ".join(f"`{n}`, `--no-{n[2:]}`" for n in names)
        else:
            takes = action.nargs != 0
            metavar = action.metavar or action.dest.upper()
            if action.choices:
                metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
            shown = ", ".join(f"`{n}{' ' + str(metavar) if takes else ''}`" for n in names)
    else:
        metavar = action.metavar or action.dest
        shown = f"`{metavar}`" + (" ..." if action.nargs in ("+", "*") else "")
        if action.choices:
            shown += " (" + ", ".join(f"`{c}`" for c in action.choices) + ")"
    help_text = (action.help or "").replace("%%", "%")
    if "(default:" not in help_text and action.default not in (None, argparse.SUPPRESS, False) and action.option_strings:
        help_text += f" (default: {action.default!r})"
    return f"| {_cell(shown)} | {_cell(help_text)} |"


def command_markdown(name: str, parser: argparse.ArgumentParser, summary: str) -> str:
    """One subcommand: its summary, then a table of flags per argument group, as `--help` groups them."""
    lines = [f"## `mobilenetv2 {name}`", "", summary[:1].upper() + summary[1:] + ".", ""]
    for group in parser._action_groups:
        rows = [row for row in map(_option_row, group._group_actions) if row]
        if not rows:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
        lines += [f"### {title}" if title not in ("arguments", "options") else f"**{title}**", ""]
        if group.description:
            lines += [group.description[:1].upper() + group.description[1:] + ".", ""]
        lines += ["| flag | what it does |", "|---|---|", *rows, ""]
    return "\n".join(lines)


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Every subcommand of `mobilenetv2`, with every flag its `--help` prints."""
    if parser is None:
        from mobilenetv2.cli import build_parser

        parser = build_parser()
    parts = []
    for name, (sub, summary) in _subcommands(parser).items():
        parts.append(command_markdown(name, sub, summary))
    return "\n".join(parts)


def config_markdown() -> str:
    """Every TrainConfig key, in the groups `train --help` uses: YAML name, type, default, help."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    lines = []
    for title, description, names in TRAIN_GROUPS:
        lines += [f"## {title[:1].upper() + title[1:]}", ""]
        if description:
            lines += [description[:1].upper() + description[1:] + ".", ""]
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for name in names:
            f = fields[name]
            kind = getattr(hints[name], "__name__", str(hints[name])).replace("typing.", "")
            lines.append(f"| `{name}` | {_cell(kind)} | `{f.default!r}` | {_cell(f.metadata.get('help', ''))} |")
        lines.append("")
    return "\n".join(lines)
