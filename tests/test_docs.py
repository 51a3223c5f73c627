"""The docs cover what users can set and run (sqlite-utils' test_docs idea)."""

import pathlib
import re

import pytest
from click.testing import CliRunner

from walbatch import Options
from walbatch.cli import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
USAGE = (ROOT / "docs" / "usage.md").read_text()


@pytest.mark.parametrize("name", Options.names())
def test_every_option_is_documented(name: str) -> None:
    assert re.search(rf"^\| `{name}` \|", USAGE, re.M), f"option {name} missing from docs/usage.md"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"walbatch {command} --help shows no example"


def test_readme_sections_in_order() -> None:
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings == ["Two commands", "In 30 seconds", "The daemon", "Guarantees", "Benchmarks"]


@pytest.mark.parametrize("command", sorted(cli.commands["dlq"].commands))  # type: ignore[attr-defined]
def test_every_dlq_subcommand_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, ["dlq", command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
