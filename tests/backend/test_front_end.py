"""Several workers behind one front end (`com4d-backend front` + `serve --connect`): real processes,
real sockets (tcp on loopback; ipc for the in-process worker link), the real pipeline with tiny
weights. Clients are the ordinary backend.client.Client, unchanged: to them the front end is one
backend."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from backend_helpers import FAST_PARAMS, SLOW_PARAMS, collect_job, raw_request, run_cli_front, start_cli_worker

from backend import cli, protocol
from backend.client import BackendError, BackendTimeout, Client, read_key_pair, read_public_key
from backend.front import FrontConfig, FrontEnd
from backend.keys import load_server_keys, make_keys
from backend.server import SecurityError, Server, ServerConfig
from backend.store import JobStore

HEARTBEAT = "0.3"  # seconds; a silent worker is given up after 4 heartbeats
NAMES = ("gpu0", "gpu1")


def owner(job: str) -> str:
    return job.split("-", 1)[0]


def meshes(messages) -> dict[tuple[str, int], protocol.Message]:
    return {(m["name"], m["frame"]): m for m in messages if m.type == "mesh"}


def assert_same_meshes(a, b) -> None:
    a, b = meshes(a), meshes(b)
    assert set(a) == set(b) and len(a) == 4  # a static object + 3 frames of a dynamic one
    for key in a:
        np.testing.assert_array_equal(a[key].arrays["vertices"], b[key].arrays["vertices"])
        np.testing.assert_array_equal(a[key].arrays["faces"], b[key].arrays["faces"])


def one_job_per_worker(client: Client, masks: Path) -> dict[str, tuple[str, list]]:
    """Two jobs submitted back to back (the second goes to the idle worker), run to the end."""
    jobs = [client.submit(masks=masks, params=FAST_PARAMS) for _ in NAMES]
    return {owner(job): (job, collect_job(client, job)) for job in jobs}


def connected_workers(client: Client, names, timeout: float) -> dict | None:
    """The front end's hello once exactly `names` are connected; None if that did not happen in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            hello = client.hello(timeout=2)
            if sorted(w["name"] for w in hello["workers"]) == sorted(names):
                return hello
        except BackendError:  # no worker yet (worker_unavailable), or the front end restarting
            pass
        time.sleep(0.1)
    return None


def until_running(client: Client, job: str) -> None:
    for message in client.job_events(job, timeout=60):
        if message.type == "progress" and message["stage"] == "stage_a":
            return
    raise AssertionError(f"job {job} ended before it ran")


class Cluster:
    """A front end process and its worker processes, each worker with its own store."""

    def __init__(self, root: Path):
        self.root = root
        self.link = "tcp://127.0.0.1:*"
        self.bind = "tcp://127.0.0.1:*"
        self.address = ""
        self.front: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def store(self, name: str) -> Path:
        return (self.root / name).resolve()

    def start_front(self) -> None:
        self.front, self.address, self.link = run_cli_front(self.link, self.bind, log=self.root / "front.log")
        self.bind = self.address  # a restart binds the same ports again

    def start_worker(self, name: str) -> None:
        self.workers[name] = start_cli_worker(
            self.store(name), self.link, name, "--heartbeat", HEARTBEAT, log=self.root / f"{name}.log"
        )

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)  # a crash: no goodbye
        proc.wait(10)

    def wait_for_workers(self, client: Client, names=NAMES, timeout: float = 60.0) -> dict:
        hello = connected_workers(client, names, timeout)
        if hello is None:
            logs = {p.name: p.read_text()[-1500:] for p in self.root.glob("*.log")}
            raise AssertionError(f"the workers {names} did not join: {logs}")
        return hello

    def close(self) -> None:
        procs = [p for p in (self.front, *self.workers.values()) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.front is not None and self.front.stdout is not None:
            self.front.stdout.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    from backend_helpers import masks_dir, weights_dir

    weights_dir(), masks_dir()  # skip early without the tiny fixtures
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_front()
        for name in NAMES:
            cluster.start_worker(name)
        with Client(cluster.address, timeout=10) as client:
            cluster.wait_for_workers(client)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def client(cluster) -> Iterator[Client]:
    with Client(cluster.address, timeout=10, name="pytest") as c:
        yield c


def test_two_jobs_submitted_at_once_run_on_both_workers_and_stream_to_their_own_clients(cluster, tiny_masks):
    results: dict[str, tuple[str, list, list]] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def run(tag: str) -> None:
        try:
            with Client(cluster.address, timeout=10, name=tag) as own:
                start.wait()
                job = own.submit(masks=tiny_masks, params=FAST_PARAMS, label=tag)
                events = collect_job(own, job, timeout=60)
                time.sleep(0.3)
                results[tag] = (job, events, own.drain())  # drain: whatever else reached this client
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    if failures:
        raise failures[0]
    assert set(results) == {"a", "b"}
    (job_a, events_a, extra_a), (job_b, events_b, extra_b) = results["a"], results["b"]
    assert {owner(job_a), owner(job_b)} == set(NAMES)  # the second went to the idle worker
    for job, events, extra in ((job_a, events_a, extra_a), (job_b, events_b, extra_b)):
        assert all(m["job"] == job for m in events) and extra == []
        done = events[-1]
        assert done.type == "done" and [m.type for m in events].count("done") == 1
        out_dir = cluster.store(owner(job)) / "jobs" / job / "out"  # it ran on the worker its id names
        assert Path(done["out_dir"]) == out_dir
        assert json.loads((out_dir / done["scene"]).read_text()) == done["manifest"]
    assert_same_meshes(events_a, events_b)  # the same clip through either worker, byte for byte


def test_status_fetch_and_cancel_reach_the_worker_that_holds_the_job(cluster, client, tiny_masks):
    job = client.submit(masks=tiny_masks, params=FAST_PARAMS, label="routed")
    live = collect_job(client, job)
    with Client(cluster.address, timeout=10) as other:  # any client may ask about any job
        status = other.status(job)
        assert (status["job"], status["state"], status["label"]) == (job, "done", "routed")
        other.fetch(job)
        replay = collect_job(other, job)
    assert replay[0].type == "job_status" and replay[-1].type == "done"
    assert_same_meshes(live, replay)

    slow = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    until_running(client, slow)
    assert client.status(slow)["state"] == "running"
    assert client.cancel(slow)["state"] in ("running", "cancelled")
    last = collect_job(client, slow)[-1]
    assert (last.type, last["code"]) == ("error", "cancelled")
    record = json.loads((cluster.store(owner(slow)) / "jobs" / slow / "job.json").read_text())
    assert record["state"] == "cancelled"  # on the owner's disk

    for name in NAMES:  # a well-formed id that its worker does not have: that worker says so
        with pytest.raises(BackendError) as info:
            client.status(f"{name}-20990101-000000-abcdef")
        assert info.value.code == "unknown_job"
    with pytest.raises(BackendError) as info:
        client.status("gpu7-20990101-000000-abcdef")
    assert info.value.code == "worker_unavailable" and "gpu7" in str(info.value)
    for bad in ("20261126-101500-3fa2c1", "../etc"):
        with pytest.raises(BackendError) as info:
            client.status(bad)
        assert info.value.code == "unknown_job"


def test_list_jobs_hello_and_ping_merge_all_workers(cluster, client, tiny_masks):
    assert set(one_job_per_worker(client, tiny_masks)) == set(NAMES)
    on_disk = {p.name for name in NAMES for p in (cluster.store(name) / "jobs").iterdir()}
    jobs = client.list_jobs()
    assert {j["job"] for j in jobs} == on_disk and {owner(j) for j in on_disk} == set(NAMES)
    created = [j["created"] for j in jobs]
    assert created == sorted(created, reverse=True)
    assert client.list_jobs(limit=2) == jobs[:2]

    hello = client.hello()
    assert sorted(w["name"] for w in hello["workers"]) == list(NAMES)
    assert hello["protocol"] == protocol.PROTOCOL_VERSION and hello["paths_allowed"] is True
    assert hello["queue"]["length"] == 0 and hello["device"] == "cpu"
    assert hello["limits"]["max_queue"] == 2 * 16  # room on both
    pong = client.ping()
    assert pong["busy"] is False and sorted(w["name"] for w in pong["workers"]) == list(NAMES)


def test_a_killed_worker_gives_clear_errors_and_works_again_once_back(cluster, client, tiny_masks):
    first = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    second = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    survivor, victim = owner(first), owner(second)
    assert survivor != victim
    until_running(client, second)

    killed_at = time.monotonic()
    cluster.kill(cluster.workers[victim])
    ending = collect_job(client, second, timeout=10)[-1]  # the follower is told, it does not hang
    assert (ending.type, ending["code"], ending["job"]) == ("error", "worker_unavailable", second)
    assert victim in ending["message"] and time.monotonic() - killed_at < 5
    with pytest.raises(BackendError) as info:
        client.status(second)
    assert info.value.code == "worker_unavailable" and victim in str(info.value)
    client.fetch(second)
    assert collect_job(client, second, timeout=10)[-1]["code"] == "worker_unavailable"

    # The front end keeps serving with the survivor.
    assert [w["name"] for w in client.hello()["workers"]] == [survivor]
    assert {owner(j["job"]) for j in client.list_jobs()} == {survivor}
    client.cancel(first)
    assert collect_job(client, first)[-1]["code"] == "cancelled"
    extra = client.submit(masks=tiny_masks, params=FAST_PARAMS)
    assert owner(extra) == survivor and collect_job(client, extra)[-1].type == "done"

    cluster.start_worker(victim)  # back, on the same store
    cluster.wait_for_workers(client)
    status = client.status(second)
    assert status["state"] == "interrupted" and status["error"]["code"] == "interrupted"
    client.fetch(second)
    assert collect_job(client, second)[-1]["code"] == "interrupted"
    again = client.submit(resubmit=second, params=FAST_PARAMS)
    assert owner(again) == victim  # its inputs are in that worker's store
    assert collect_job(client, again)[-1].type == "done"


def test_a_frozen_worker_is_given_up_and_taken_back_when_it_answers_again(cluster, client, tiny_masks):
    slow = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    until_running(client, slow)
    frozen = cluster.workers[owner(slow)]
    frozen.send_signal(signal.SIGSTOP)  # hung, not crashed: its connection stays open
    try:
        with pytest.raises(BackendError) as info:  # forwarded, then its worker is given up: answered anyway
            client.status(slow, timeout=10)
        assert info.value.code == "worker_unavailable"
        ending = collect_job(client, slow, timeout=10)[-1]
        assert (ending.type, ending["code"], ending["job"]) == ("error", "worker_unavailable", slow)
    finally:
        frozen.send_signal(signal.SIGCONT)
    cluster.wait_for_workers(client)  # the same process, heard again
    time.sleep(0.5)
    assert [m.type for m in client.drain() if m.get("job") == slow] == []  # its stream had ended for this client

    client.fetch(slow)  # following it again works
    first = next(iter(client.job_events(slow)))
    assert (first.type, first["state"]) == ("job_status", "running")
    client.cancel(slow)
    assert collect_job(client, slow)[-1]["code"] == "cancelled"


def test_a_restarted_front_end_still_routes_every_job_by_its_prefix(cluster, client, tiny_masks):
    finished = one_job_per_worker(client, tiny_masks)
    assert set(finished) == set(NAMES)

    cluster.kill(cluster.front)
    cluster.front.stdout.close()
    cluster.start_front()
    cluster.wait_for_workers(client, timeout=20)  # the same client: its socket reconnected by itself
    for job, live in finished.values():
        assert client.status(job)["state"] == "done"
        client.fetch(job)
        assert_same_meshes(live, collect_job(client, job))
    assert set(one_job_per_worker(client, tiny_masks)) == set(NAMES)


# -- in-process front ends: security and bad input ------------------------------------------------


@pytest.fixture
def keys(tmp_path) -> Path:
    if not zmq.has("curve"):
        pytest.skip("libzmq without CurveZMQ")
    make_keys(tmp_path / "keys")
    return tmp_path / "keys"


def test_a_front_end_refuses_a_public_bind_without_keys_and_workers_from_afar(tmp_path, capsys):
    with pytest.raises(SecurityError, match="keys"):
        FrontEnd(FrontConfig(bind="tcp://0.0.0.0:5598", workers=f"ipc://{tmp_path}/w")).bind()
    with pytest.raises(ValueError, match="not on this machine"):
        FrontEnd(FrontConfig(workers="tcp://0.0.0.0:5600")).bind()
    with pytest.raises(ValueError, match="not on this machine"):
        Server(None, JobStore(tmp_path / "s"), ServerConfig(connect="tcp://10.1.2.3:5600", name="gpu0")).bind()
    for name in (None, "gpu-0", "0gpu", "g" * 40):
        with pytest.raises(ValueError, match="name"):
            Server(None, JobStore(tmp_path / "s"), ServerConfig(connect=f"ipc://{tmp_path}/w", name=name)).bind()
    assert cli.main(["front", "--bind", "tcp://0.0.0.0:5598", "--workers", f"ipc://{tmp_path}/w"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to bind tcp://0.0.0.0:5598" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["front", "--help"])
    assert info.value.code == 0 and "  com4d-backend front " in capsys.readouterr().out.split("examples:")[1]


def test_a_keyed_public_front_end_admits_key_holders_uploads_and_no_file_paths(
    tmp_path, keys, tiny_pipeline, tiny_masks, caplog
):
    front = FrontEnd(
        FrontConfig(
            bind="tcp://0.0.0.0:*",
            workers=f"ipc://{tmp_path}/workers",
            server_keys=load_server_keys(keys),
            authorized_clients=keys / "clients",
            startup_grace_s=0.2,
        )
    )
    front.start()
    port = front.address.rsplit(":", 1)[1]
    worker = Server(tiny_pipeline, JobStore(tmp_path / "store"), ServerConfig(connect=front.workers_address, name="w0"))
    twin = Server(tiny_pipeline, JobStore(tmp_path / "twin"), ServerConfig(connect=front.workers_address, name="w0"))
    try:
        worker.start()
        server_key = read_public_key(keys / "server.key")
        admitted = read_key_pair(keys / "clients/client.key_secret")
        with Client(f"tcp://127.0.0.1:{port}", server_key, admitted, timeout=10) as client:
            assert connected_workers(client, ["w0"], timeout=20) is not None
            with caplog.at_level(logging.WARNING, logger="com4d.backend.front"):
                twin.start()  # a second worker with a name already taken is refused, not mixed in
                deadline = time.monotonic() + 10
                while "duplicate_name" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert "duplicate_name" in caplog.text
            hello = client.hello()
            assert hello["paths_allowed"] is False and [w["name"] for w in hello["workers"]] == ["w0"]
            for kwargs in ({"masks": tiny_masks}, {"video": tiny_masks / "frames", "prompts": {"objects": []}}):
                with pytest.raises(BackendError) as info:
                    client.submit(**kwargs, same_machine=True)
                assert info.value.code == "forbidden"
            job = client.submit(masks=tiny_masks, params=FAST_PARAMS, same_machine=False)
            assert owner(job) == "w0" and collect_job(client, job)[-1].type == "done"
            assert (tmp_path / "store" / "jobs" / job / "inputs" / "masks").is_dir()  # uploaded, then run

            twin.stop()
            worker.stop()  # a clean stop says goodbye: no waiting for 4 missed heartbeats (4 s here)
            stopped = time.monotonic()
            with pytest.raises(BackendError) as info:
                client.hello()
            assert info.value.code == "worker_unavailable" and time.monotonic() - stopped < 2
        with Client(f"tcp://127.0.0.1:{port}", server_key, zmq.curve_keypair(), timeout=1.5) as stranger:
            with pytest.raises(BackendTimeout):
                stranger.ping()
    finally:
        twin.stop()
        worker.stop()
        front.stop()


def test_a_front_end_answers_bad_messages_and_worker_messages_from_clients_with_errors(tmp_path):
    front = FrontEnd(FrontConfig(bind="tcp://127.0.0.1:*", workers=f"ipc://{tmp_path}/w", startup_grace_s=0))
    front.start()
    try:
        assert raw_request(front.address, [b"\xc1 not msgpack"])["code"] == "bad_message"
        posing = protocol.make("worker_ready", 5, name="gpu0", instance="x", protocol=1, length=0)
        reply = raw_request(front.address, protocol.encode(posing))
        assert (reply["code"], reply.id) == ("unknown_type", 5)  # clients cannot pose as workers
        reply = raw_request(front.address, protocol.encode(protocol.make("status", 6)))
        assert (reply["code"], reply["request"]) == ("bad_field", "status")
        with Client(front.address, timeout=5) as client:
            with pytest.raises(BackendError) as info:
                client.hello()
            assert info.value.code == "worker_unavailable" and "no worker" in str(info.value)
            with pytest.raises(BackendError) as info:
                client.submit(masks=tmp_path)
            assert info.value.code == "worker_unavailable"
    finally:
        front.stop()
