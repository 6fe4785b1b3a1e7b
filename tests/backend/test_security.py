"""Secure by default: loopback unless keys, CurveZMQ with admitted clients, no file paths from afar,
no pickle."""

from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest
import zmq
from backend_helpers import FAST_PARAMS, collect_job, start_server

from backend.client import BackendError, Client, read_key_pair, read_public_key
from backend.keys import load_server_keys, make_keys
from backend.server import SecurityError, ServerConfig, check_security

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CurveZMQ")


@pytest.fixture
def keys(tmp_path) -> Path:
    folder = tmp_path / "keys"
    make_keys(folder)
    return folder


def test_keys_makes_a_server_pair_and_a_client_pair_with_private_secrets(keys):
    for name in ("server.key", "server.key_secret", "clients/client.key", "clients/client.key_secret"):
        assert (keys / name).is_file()
    for secret in ("server.key_secret", "clients/client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600
    public, secret = load_server_keys(keys)
    assert public == read_public_key(keys / "server.key") and len(secret) == 40
    with pytest.raises(FileExistsError):
        make_keys(keys, client="client")


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.0.2:5555"])
def test_a_non_loopback_bind_without_keys_refuses_to_start(bind, tiny_pipeline, tmp_path):
    with pytest.raises(SecurityError, match="keys"):
        check_security(ServerConfig(bind=bind))
    with pytest.raises(SecurityError):
        start_server(tiny_pipeline, tmp_path / "store", bind=bind)


def test_keys_without_a_client_policy_also_refuse_a_public_bind(keys):
    config = ServerConfig(bind="tcp://0.0.0.0:5555", server_keys=load_server_keys(keys))
    with pytest.raises(SecurityError, match="--clients"):
        check_security(config)
    check_security(ServerConfig(bind="tcp://0.0.0.0:5555", server_keys=load_server_keys(keys), allow_any_client=True))


def test_only_admitted_clients_that_know_the_server_key_get_answers(tiny_pipeline, tmp_path, keys):
    server = start_server(
        tiny_pipeline, tmp_path / "store", server_keys=load_server_keys(keys), authorized_clients=keys / "clients"
    )
    server_key = read_public_key(keys / "server.key")
    try:
        with Client(
            server.address, server_key, read_key_pair(keys / "clients/client.key_secret"), timeout=10
        ) as admitted:
            assert admitted.ping()["busy"] is False
        with Client(server.address, server_key, zmq.curve_keypair(), timeout=1.5) as stranger:
            with pytest.raises(BackendError, match="keys"):
                stranger.ping()
        with Client(server.address, timeout=1.5) as plaintext:
            with pytest.raises(BackendError):
                plaintext.ping()
        wrong_server_key = zmq.curve_keypair()[0]
        with Client(
            server.address, wrong_server_key, read_key_pair(keys / "clients/client.key_secret"), timeout=1.5
        ) as confused:
            with pytest.raises(BackendError):
                confused.ping()
    finally:
        server.stop()


def test_a_public_bind_takes_uploads_but_no_file_paths(tiny_pipeline, tmp_path, keys, tiny_masks):
    server = start_server(
        tiny_pipeline,
        tmp_path / "store",
        bind="tcp://0.0.0.0:*",
        server_keys=load_server_keys(keys),
        allow_any_client=True,
    )
    port = server.address.rsplit(":", 1)[1]
    try:
        with Client(f"tcp://127.0.0.1:{port}", read_public_key(keys / "server.key"), timeout=10) as client:
            assert client.hello()["paths_allowed"] is False
            for kwargs in ({"masks": tiny_masks}, {"video": tiny_masks / "frames", "prompts": {"objects": []}}):
                with pytest.raises(BackendError) as info:
                    client.submit(**kwargs, same_machine=True)
                assert info.value.code == "forbidden"
            job = client.submit(masks=tiny_masks, params=FAST_PARAMS, same_machine=False)
            assert collect_job(client, job)[-1].type == "done"
    finally:
        server.stop()


BACKEND = Path(__file__).resolve().parents[2] / "backend"


@pytest.mark.parametrize("path", sorted(BACKEND.glob("*.py")), ids=lambda p: p.name)
def test_no_backend_module_imports_pickle_or_loads_pickled_arrays(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & {"pickle", "cPickle", "dill", "cloudpickle"}
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in {"pickle", "dill", "cloudpickle"}
        if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            assert isinstance(node.value, ast.Constant) and node.value.value is False
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"recv_pyobj", "send_pyobj"}
