"""Click options that commands of several layers declare, each declared once (names, parameter name, type).

A command words the help for its own use. The engine options (--model, --medusa, --device, ...) are
engine/options.py's; these are the ones a command below the engine (heads) shares too.
"""

from __future__ import annotations

import click

OVERWRITE_HELP = "Replace an existing non-empty --out."


def out_dir_option(help: str, alias: str = "--output_dir"):
    """The directory the command writes (required); ``alias`` is the upstream tool's name for it."""
    return click.option("--out", alias, "out", required=True, type=click.Path(), help=help)


def report_option(help: str):
    """Where to write an optional report."""
    return click.option("--out", type=click.Path(), default=None, help=help)


def overwrite_option(help: str = OVERWRITE_HELP):
    return click.option("--overwrite", is_flag=True, help=help)


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def progress_option():
    return click.option("--progress/--no-progress", default=True, show_default=True)


def calib_prompts_option(help: str):
    return click.option("--calib-prompts", type=click.Path(), default=None, help=help)


def with_options(options: list):
    """Apply click options in the order listed (first listed = first in --help)."""

    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco
