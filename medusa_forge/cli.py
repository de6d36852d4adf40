"""The ``medusa-forge`` command line: one subcommand per pipeline stage.

Subcommands live next to the stage they drive (``medusa_forge/<stage>/cli.py``) and are imported
only when used, so ``medusa-forge query`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys
import threading

import click

from medusa_forge import __version__
from medusa_forge.errors import ForgeError

# name -> "module:attribute", in pipeline order
COMMANDS: dict[str, str] = {
    "train-heads": "medusa_forge.train.cli:train_heads",
    "heads": "medusa_forge.heads.cli:heads",
    "convert": "medusa_forge.convert.cli:convert",
    "build": "medusa_forge.build.cli:build",
    "generate": "medusa_forge.serve.generate:generate",
    "triton-repo": "medusa_forge.serve.cli:triton_repo",
    "serve": "medusa_forge.serve.cli:serve",
    "query": "medusa_forge.serve.cli:query",
    "eval": "medusa_forge.eval.cli:eval_group",
    "promote": "medusa_forge.eval.cli:promote",
    "bench": "medusa_forge.bench.cli:bench",
    "demo": "medusa_forge.demo.cli:demo",
}


def _available(name: str) -> bool:
    module = COMMANDS[name].split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="medusa-forge")
def cli() -> None:
    """Build, verify, serve and gate Medusa speculative-decoding engines.

    Pipeline: train-heads -> convert -> build -> triton-repo / serve -> eval -> promote.
    Flags echo TensorRT-LLM's examples where they mean the same thing (--model_dir is --model,
    --tp_size is --tp-size, --max_draft_len is --max-draft-len).
    """


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT), raised where the process is, so every writer's cleanup runs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # signals caught, so a wrapped Interrupted is still told apart from a bug


def _raise_interrupted(signum, _frame) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def interrupted_message(signum: int, command: str | None) -> str:
    """What an interrupted command prints: nothing half-written exists, and how to carry on."""
    how = "re-run the same command"
    if command == "train-heads":
        how += " with --resume to continue from its last checkpoint (<out>.ckpt), if it saved one"
    return (
        f"interrupted by {signal.Signals(signum).name}: no output was published (outputs appear only when "
        f"complete, so any previous output is intact); {how}"
    )


def _interrupt_signum(exc: BaseException) -> int:
    cause = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__  # click wraps Ctrl-C as Abort
    return getattr(cause, "signum", signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; bugs keep their traceback.

    SIGTERM and SIGINT interrupt the command like Ctrl-C: the stage's temporary output is removed,
    the previous output stays as it was, one line says so, and the exit status is 128 + the signal.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in args if not a.startswith("-")), None)
    previous = None
    _received.clear()  # a signal caught by an earlier in-process run is not this run's
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        code = cli.main(args=args, standalone_mode=False)
        if isinstance(code, int) and code:  # click returns ctx.exit(n) codes when not standalone
            sys.exit(code)
    except ForgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:
        signum = _interrupt_signum(e)
        click.echo(f"error: {interrupted_message(signum, command)}", err=True)
        sys.exit(128 + signum)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception:
        if not _received:
            raise
        # C code the signal interrupted (torch, Triton's interpreter) may re-raise it as another type
        click.echo(f"error: {interrupted_message(_received[-1], command)}", err=True)
        sys.exit(128 + _received[-1])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
