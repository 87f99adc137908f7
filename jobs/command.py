"""The command line every job shares: `--config FILE`, `key=value` overrides, flag aliases.

A `JobCommand` describes one job: its config model, the function that runs a validated
config, and its short flags (`--input` for `data.input`). `run_command` parses the
arguments, loads and validates the config, and only then imports the job's code (torch,
Ray, open_clip), so a config error costs no heavy import. `run_main` turns outcomes into
exit statuses: 0 done, 1 the job found problems, 2 a config error (one line), 130
interrupted (one line saying what was kept and how to resume).

Used by `clipcleaner <subcommand>` (jobs/cli.py) and by `python -m jobs.<name>` alike.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleaner.config import (
    ConfigError,
    apply_overrides,
    read_config_file,
    set_key,
    validate_config,
)
from cleaner.config_keys import format_config_keys

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
"""A `key=value` argument: a dotted key, then `=` (a path such as s3://b/k=v is not one)."""

PROJECT_LOGGERS = ("cleaner", "training", "jobs")
EXIT_PROBLEMS = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job; the message says what was kept and how to resume."""


@dataclass(frozen=True)
class JobCommand:
    """One job's command line. Code is named by `module:attribute` strings, imported late."""

    name: str
    """the subcommand (`clipcleaner <name>`)"""
    summary: str
    module: str
    """`python -m <module>` runs the same command"""
    config: str
    """the pydantic config model"""
    run: str
    """the function called with the validated config (an int result is the exit status)"""
    flags: Mapping[str, str] = field(default_factory=dict)
    """value flags and the key each sets: {"--input": "data.input"}"""
    switches: Mapping[str, str] = field(default_factory=dict)
    """flags without a value, each setting its key to true: {"--dry-run": "dry_run"}"""
    section_files: Mapping[str, str] = field(default_factory=dict)
    """flags naming a YAML file that fills one section: {"--clean-config": "clean"}"""
    positional: str | None = None
    """the key that bare arguments (not key=value) fill, as a list"""
    prepare: str | None = None
    """a function given the raw config mapping before validation (fills linked keys)"""
    base_config: str | None = None
    """a config file (relative to the repository) used when no --config is given"""
    interrupted: Callable[[Any], str] | None = None
    """the Ctrl-C line: what was kept and how to resume, from the validated config"""
    notes: str = ""


@dataclass
class ParsedArgs:
    config: str | None
    overrides: list[str]
    values: list[tuple[str, Any]]
    """keys set by flags, switches and bare arguments"""
    section_files: list[tuple[str, str]]

    @property
    def empty(self) -> bool:
        return not (self.config or self.overrides or self.values or self.section_files)


def resolve(target: str) -> Any:
    """The object a `module:attribute` string names."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def config_model(command: JobCommand):
    """The command's config model; a ConfigError when this install lacks it."""
    try:
        return resolve(command.config)
    except (ModuleNotFoundError, AttributeError) as err:
        raise ConfigError(
            f"`clipcleaner {command.name}` needs {command.config}, which this install lacks ({err})"
        ) from None


def build_parser(command: JobCommand, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a command; its --help lists every config key."""
    epilog = [textwrap.fill(command.notes, 88)] if command.notes else []
    epilog.append(
        "config keys (in the --config YAML, or key=value, which wins over the file and\n"
        "the flags):\n" + wrap_help(format_config_keys(config_model(command)))
    )
    parser = argparse.ArgumentParser(
        prog=prog or f"clipcleaner {command.name}",
        description=textwrap.fill(command.summary, 88),
        epilog="\n\n".join(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = f" (default: {command.base_config})" if command.base_config else ""
    parser.add_argument("--config", metavar="FILE", help=f"job config YAML{default}")
    for flag, key in command.flags.items():
        parser.add_argument(flag, dest=_dest(flag), metavar="VALUE", help=f"same as {key}=VALUE")
    for flag, key in command.switches.items():
        parser.add_argument(flag, dest=_dest(flag), action="store_true", help=f"{key}=true")
    for flag, section in command.section_files.items():
        parser.add_argument(
            flag, dest=_dest(flag), metavar="FILE", help=f"YAML for the {section}: section"
        )
    what = f"{command.positional} values and key=value" if command.positional else "key=value"
    parser.add_argument("arguments", nargs="*", metavar="ARG", help=f"{what} overrides")
    return parser


def parse_command_args(
    command: JobCommand, argv: list[str] | None, prog: str | None = None
) -> ParsedArgs:
    args = build_parser(command, prog).parse_intermixed_args(argv)
    values: list[tuple[str, Any]] = []
    for flag, key in command.flags.items():
        if (value := getattr(args, _dest(flag))) is not None:
            values.append((key, value))
    values.extend(
        (key, True) for flag, key in command.switches.items() if getattr(args, _dest(flag))
    )
    sections = [
        (section, value)
        for flag, section in command.section_files.items()
        if (value := getattr(args, _dest(flag))) is not None
    ]
    overrides = [a for a in args.arguments if OVERRIDE.match(a)]
    bare = [a for a in args.arguments if not OVERRIDE.match(a)]
    if bare and command.positional is None:
        raise ConfigError(f"{bare[0]!r} is not a key=value override")
    if bare:
        values.append((command.positional, bare))
    return ParsedArgs(args.config, overrides, values, sections)


def load_command_config(command: JobCommand, parsed: ParsedArgs):
    """The validated config: the --config file (or the command's base), section files,
    flags, then key=value overrides."""
    path = parsed.config or _base_config(command)
    if path is None and parsed.empty:
        raise ConfigError(
            f"give --config <yaml> and/or key=value overrides "
            f"(`clipcleaner {command.name} --help` lists the keys)"
        )
    data = read_config_file(path) if path else {}
    for section, file in parsed.section_files:
        data[section] = merged(read_config_file(file), data.get(section) or {})
    for key, value in parsed.values:
        set_key(data, key, value)
    apply_overrides(data, parsed.overrides)
    if command.prepare:
        resolve(command.prepare)(data)
    return validate_config(data, config_model(command))


def run_command(command: JobCommand, argv: list[str] | None = None, prog: str | None = None):
    """Parse, validate, then import and run the job; returns its exit status.

    Raises ConfigError for a bad config, JobInterrupted on Ctrl-C during the job."""
    parsed = parse_command_args(command, argv, prog)
    cfg = load_command_config(command, parsed)
    run = resolve(command.run)
    try:
        result = run(cfg)
    except JobInterrupted:  # the job said itself what it kept
        raise
    except KeyboardInterrupt:
        raise JobInterrupted(interrupted_line(command, cfg)) from None
    return result if type(result) is int else 0


def interrupted_line(command: JobCommand, cfg) -> str:
    """What was kept and how to resume; a generic line when the job cannot say."""
    if command.interrupted is not None:
        try:
            return command.interrupted(cfg)
        except (OSError, ValueError) as err:  # e.g. the output folder cannot be listed
            logging.getLogger(__name__).debug("interrupt summary failed: %s", err)
    return "outputs written so far are kept; rerun the same command to go on"


def run_main(main: Callable[[], int | None]) -> None:
    """Run a job's main and exit: 2 with one line for a config error, 130 with one line
    for Ctrl-C, no stack trace for either."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for ours in PROJECT_LOGGERS:  # the project's INFO lines; others' (matplotlib, boto) stay out
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        code = main() or 0
    except JobInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to go on", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    sys.exit(code)


def parse_job_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`--config <yaml> [key=value ...]`, for a job module that parses its own arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="job config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def wrap_help(text: str, width: int = 96) -> str:
    """Wrap the long description lines of format_config_keys, keeping their indent."""
    lines = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        lines.extend(textwrap.wrap(line, width, subsequent_indent=indent) or [""])
    return "\n".join(lines)


def merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (nested mappings merge, other values replace)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def _base_config(command: JobCommand) -> str | None:
    if command.base_config is None:
        return None
    return str(Path(__file__).resolve().parent.parent / command.base_config)


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")
