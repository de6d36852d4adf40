"""An interruption that C code re-raised as another exception still exits as an interruption."""

import signal

import pytest

from medusa_forge import cli


def _fails_with(received: list[int]):
    def run(**_kw):
        cli._received[:] = received
        raise RuntimeError("raised from C code")

    return run


def test_an_error_after_a_caught_sigterm_exits_143_with_the_interrupted_line(monkeypatch, capsys):
    monkeypatch.setattr(cli.cli, "main", _fails_with([signal.SIGTERM]))
    with pytest.raises(SystemExit) as exc:
        cli.main(["build", "native"])
    assert exc.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("error: interrupted by SIGTERM")


def test_the_same_error_without_a_signal_is_a_bug_and_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli.cli, "main", _fails_with([]))
    with pytest.raises(RuntimeError, match="raised from C code"):
        cli.main(["build", "native"])
