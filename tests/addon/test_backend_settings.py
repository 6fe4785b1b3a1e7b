"""What the preferences turn into: the local backend's command line and process, the keys, the params."""

from __future__ import annotations

import socket
import sys
import time

import bpy
import pytest
import zmq
import zmq.auth


def test_serve_command_is_the_backend_cli_with_the_preferences(addon, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    sam = tmp_path / "sam.pth"
    sam.write_bytes(b"x")

    command = addon.local_backend.serve_command(
        sys.executable, str(weights), "tcp://127.0.0.1:5601", str(tmp_path / "store"), "cuda:1", str(sam)
    )

    assert command == [
        sys.executable,
        "-m",
        "backend.cli",
        "serve",
        "--weights",
        str(weights),
        "--bind",
        "tcp://127.0.0.1:5601",
        "--store",
        str(tmp_path / "store"),
        "--device",
        "cuda:1",
        "--sam",
        str(sam),
    ]


@pytest.mark.parametrize(
    "python, weights, bind, message",
    [
        ("", "W", "tcp://127.0.0.1:1", "set the backend's Python executable"),
        ("/no/such/python", "W", "tcp://127.0.0.1:1", "does not exist"),
        ("PY", "/no/such/weights", "tcp://127.0.0.1:1", "weights folder /no/such/weights does not exist"),
        ("PY", "W", "tcp://192.168.1.5:5555", "listens on this machine only"),
    ],
)
def test_serve_command_refuses_settings_that_cannot_work(addon, tmp_path, python, weights, bind, message):
    python = sys.executable if python == "PY" else python
    weights = str(tmp_path) if weights == "W" else weights
    with pytest.raises(addon.local_backend.LocalBackendError, match=message):
        addon.local_backend.serve_command(python, weights, bind, str(tmp_path))


def test_a_backend_that_exits_at_once_is_reported_with_its_log(addon, tmp_path):
    command = [sys.executable, "-c", "import sys; print('no weights here'); sys.exit(3)"]
    backend = addon.local_backend.LocalBackend(command, tmp_path / "logs" / "backend.log").start()

    with pytest.raises(
        addon.local_backend.LocalBackendError, match="exited with code 3(.|\n)*no weights here"
    ):
        backend.wait_until_serving("tcp://127.0.0.1:9", timeout=20.0)


def test_stop_ends_the_process(addon, tmp_path):
    backend = addon.local_backend.LocalBackend(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "backend.log"
    ).start()
    assert backend.running
    started = time.monotonic()
    backend.stop(timeout=5.0)
    assert not backend.running and time.monotonic() - started < 5.0


def test_keys_come_from_key_files_or_text(addon, tmp_path):
    server_public, server_secret = zmq.auth.create_certificates(str(tmp_path), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(tmp_path), "client")
    load = addon.credentials.load_credentials
    public_text = zmq.auth.load_certificate(server_public)[0]

    from_file = load(server_public, client_secret)
    from_text = load(public_text.decode())

    assert from_file.server_key == public_text == from_text.server_key
    assert from_file.client_keys == zmq.auth.load_certificate(client_secret)
    assert load("", "") == addon.credentials.Credentials(None, None)
    with pytest.raises(addon.credentials.CredentialsError, match="40 characters"):
        load("too-short")
    with pytest.raises(addon.credentials.CredentialsError, match="needs the server's public key"):
        load("", client_secret)


def test_the_library_accepts_the_parameters_the_add_on_sends(addon):
    from com4d.params import ReconstructionParams

    for frames, tokens, steps, detail, topology, guidance, seed in [
        ([0, 2, 4], 2048, 50, 9, "per_frame", 7.0, 0),
        ([5], 512, 120, 5, "tracked", 1.0, 12345),
    ]:
        sent = addon.params.reconstruction_params(frames, tokens, steps, detail, topology, guidance, seed, True)
        params = ReconstructionParams.from_dict(sent)
        chosen = list(range(params.frame_start, params.frame_end, params.frame_stride))
        assert chosen == frames and params.num_tokens == tokens and params.scene_steps == steps
        assert params.mesh_final_depth == detail and params.topology == topology
        assert params.scene_guidance == params.dynamic_guidance == guidance and params.seed == seed
        assert params.allow_lost is True


def test_parameters_the_backend_would_refuse_are_refused_before_sending(addon):
    with pytest.raises(ValueError, match="scene_steps"):
        addon.params.reconstruction_params([0, 2], 2048, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        addon.params.reconstruction_params([0, 2], 8192, 50)
    with pytest.raises(ValueError, match="evenly spaced"):
        addon.params.reconstruction_params([0, 2, 5], 2048, 50)


def test_check_connection_shows_how_many_jobs_wait_in_the_queue(addon, scene, prefs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefs.address = f"tcp://127.0.0.1:{port}"
    prefs.connect_timeout = 5.0
    server = addon.zmq_context.context().socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(prefs.address)
    state = bpy.data.window_managers[0].com4d_job
    try:
        assert bpy.ops.com4d.check_connection() == {"FINISHED"}
        assert server.poll(5000), "the add-on said no hello"
        identity, *frames = server.recv_multipart()
        hello = addon.protocol.decode(frames, direction="request")
        queue = {"running": "j0", "queued": ["j1", "j2", "j3"], "length": 4}  # the protocol's shape
        reply = addon.protocol.make(
            "hello", hello.id, protocol=1, server="test-backend", model={}, device="cuda:1", queue=queue
        )
        server.send_multipart([identity, *addon.protocol.encode(reply)])
        deadline = time.monotonic() + 10
        while addon.operators.apply_connection_checks() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()

    assert state.connection == "connected: test-backend on cuda:1, 3 queued"
