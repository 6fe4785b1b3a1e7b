"""A server killed in the middle of a job and started again on the same store: finished results are
served as before, the interrupted job says so and can be resubmitted. The servers here are real
`python -m backend.cli serve` processes."""

from __future__ import annotations

import signal

import numpy as np
from backend_helpers import FAST_PARAMS, SLOW_PARAMS, collect_job, run_cli_server

from backend.client import Client


def test_a_restarted_server_serves_finished_results_and_marks_the_interrupted_job(tmp_path, tiny_masks):
    store = tmp_path / "store"
    first, address = run_cli_server(store)
    try:
        with Client(address, timeout=20) as client:
            finished = client.submit(masks=tiny_masks, params=FAST_PARAMS)
            live = collect_job(client, finished)
            assert live[-1].type == "done"
            killed = client.submit(masks=tiny_masks, params=SLOW_PARAMS, label="long")
            for message in client.job_events(killed, timeout=60):
                if message.type == "progress" and message["stage"] == "stage_a":
                    break
            first.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
            first.wait(10)
    finally:
        first.kill()
        first.wait(10)

    second, address = run_cli_server(store)
    try:
        with Client(address, timeout=20) as client:
            states = {j["job"]: j["state"] for j in client.list_jobs()}
            assert states == {finished: "done", killed: "interrupted"}

            client.fetch(finished)
            replay = collect_job(client, finished)
            assert replay[0]["state"] == "done" and replay[-1].type == "done"
            before = {(m["name"], m["frame"]): m for m in live if m.type == "mesh"}
            after = {(m["name"], m["frame"]): m for m in replay if m.type == "mesh"}
            assert set(after) == set(before)
            for key, mesh in before.items():
                np.testing.assert_array_equal(after[key].arrays["vertices"], mesh.arrays["vertices"])
                np.testing.assert_array_equal(after[key].arrays["faces"], mesh.arrays["faces"])

            status = client.status(killed)
            assert status["state"] == "interrupted" and status["error"]["code"] == "interrupted"
            assert status["label"] == "long"
            client.fetch(killed)
            last = collect_job(client, killed)[-1]
            assert (last.type, last["code"]) == ("error", "interrupted")

            again = client.submit(resubmit=killed, params=FAST_PARAMS)
            assert collect_job(client, again)[-1].type == "done"
        second.send_signal(signal.SIGTERM)  # a clean stop exits 0
        assert second.wait(30) == 0
    finally:
        second.kill()
        second.wait(10)
