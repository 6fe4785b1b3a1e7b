"""The `com4d` command line itself: every subcommand is registered, nothing disappears silently."""

from __future__ import annotations

import pytest

from com4d.cli import build_parser
from com4d.cli import main as cli_main


def test_segment_is_a_subcommand_and_reaches_its_own_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["segment", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--prompts" in out and "--sam" in out  # the segment parser answered, not the top-level one


def test_top_level_help_lists_every_command():
    helptext = build_parser().format_help()
    for command in ("reconstruct", "segment", "demo"):
        assert command in helptext
