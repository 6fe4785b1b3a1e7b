"""`com4d-backend`: its subcommands, their help, and the one-line errors."""

from __future__ import annotations

import json

import pytest

from backend import cli


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["keys", "--help"], ["ping", "--help"]])
def test_every_command_has_help_with_an_example(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    command = argv[0] if argv[0] != "--help" else "serve"
    assert f"  com4d-backend {command} " in capsys.readouterr().out.split("examples:")[1]


def test_serve_on_a_public_address_without_keys_fails_at_once_with_one_line(tmp_path, capsys):
    code = cli.main(
        [
            "serve",
            "--weights",
            str(tmp_path / "none"),
            "--store",
            str(tmp_path / "s"),
            "--bind",
            "tcp://0.0.0.0:5599",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "refusing to bind tcp://0.0.0.0:5599" in err and "com4d-backend keys" in err


def test_serve_with_missing_weights_names_the_folder(tmp_path, capsys):
    code = cli.main(
        ["serve", "--weights", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s"), "--device", "cpu"]
    )
    assert code == 1 and "nowhere" in capsys.readouterr().err


def test_keys_then_ping_against_a_keyed_server(tmp_path, capsys, tiny_pipeline):
    from backend_helpers import start_server

    from backend.keys import load_server_keys

    assert cli.main(["keys", str(tmp_path / "k")]) == 0
    assert "--keys" in capsys.readouterr().out
    server = start_server(
        tiny_pipeline,
        tmp_path / "store",
        server_keys=load_server_keys(tmp_path / "k"),
        authorized_clients=tmp_path / "k" / "clients",
    )
    try:
        code = cli.main(
            [
                "ping",
                "--connect",
                server.address,
                "--server-key",
                str(tmp_path / "k/server.key"),
                "--client-key",
                str(tmp_path / "k/clients/client.key_secret"),
            ]
        )
        assert code == 0
        assert json.loads(capsys.readouterr().out)["model"]["model"] == "COM4D"
        code = cli.main(["ping", "--connect", server.address, "--timeout", "1"])  # no keys: no answer
        assert code == 1 and "timeout" in capsys.readouterr().err
    finally:
        server.stop()


@pytest.mark.parametrize(
    "text, size",
    [("1048576", 1048576), ("8GiB", 8 * 2**30), ("500MB", 500_000_000), ("1.5 gib", int(1.5 * 2**30)), ("20k", 20_000)],
)
def test_sizes_are_read_with_units(text, size):
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-3GB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(Exception, match="not a size"):
        cli.parse_size(text)
