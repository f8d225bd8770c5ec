"""The `ampacity` command line: every command listed without importing it, and the version."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from ampacity.cli import COMMANDS, build_parser, main, version


@pytest.mark.parametrize("module", sorted({module for module, _ in COMMANDS.values()}))
def test_the_listed_help_is_what_the_module_registers(module: str) -> None:
    subparsers = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(subparsers)
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered == {name: help_text for name, (m, help_text) in COMMANDS.items() if m == module}


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from ampacity.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    main(['--help'])\n"
        "assert 'observability' in out.getvalue()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'aiohttp', 'httpx', 'kopf')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ampacity {version()}"
    assert version() != "unknown"


def test_a_command_runs_with_only_its_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "generate", "--check"]) == 0


def test_the_full_parser_knows_every_subcommand() -> None:
    args = build_parser().parse_args(["federated", "aggregator", "--port=1", "--state-dir=/state"])
    assert args.command == "federated"
