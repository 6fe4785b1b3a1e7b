"""A store whose disk refuses writes mid-job: the job still reaches a final state that every client
sees (its follower, `status`, `fetch`, `hello`), and the server serves on.

The disk really fails: as root the store lives on a tiny tmpfs that the test fills up (ENOSPC);
otherwise (not root) the job's folder and event log are made read-only (EACCES)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_helpers import SLOW_PARAMS, collect_job, start_server, wait_for

from backend.client import Client


@contextlib.contextmanager
def failing_disk(folder: Path) -> Iterator[callable]:
    """A folder for a store and a function `break_disk(job_dir)` after which writes there fail."""
    folder.mkdir()
    root = os.geteuid() == 0
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]
    mounted = root and subprocess.run(mount, capture_output=True).returncode == 0
    if root and not mounted:  # root writes through any file mode: only a full filesystem fails it
        pytest.skip("running as root where mounting a tmpfs is not allowed: no way to make the disk fail")

    def break_disk(job_dir: Path) -> None:
        if mounted:  # fill the filesystem to its last byte
            with open(folder / "filler", "wb", buffering=0) as fh:
                for chunk in (65536, 1):
                    with contextlib.suppress(OSError):
                        while True:
                            fh.write(b"\0" * chunk)
        else:
            for path in (job_dir, job_dir / "stream", job_dir / "out"):
                path.chmod(stat.S_IRUSR | stat.S_IXUSR)
            (job_dir / "events.jsonl").chmod(stat.S_IRUSR)

    try:
        yield break_disk
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        else:
            for path in folder.rglob("*"):
                with contextlib.suppress(OSError):
                    path.chmod(0o700)


def test_a_store_that_fails_writes_mid_job_still_ends_the_job_for_everyone(tiny_pipeline, tiny_masks, tmp_path):
    with failing_disk(tmp_path / "disk") as break_disk:
        server = start_server(tiny_pipeline, tmp_path / "disk" / "store")
        try:
            with Client(server.address, timeout=10) as client:
                job = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
                wait_for(client, job, lambda m: m.type == "progress" and m["stage"] == "stage_a")
                break_disk(server.store.job_dir(job))
                last = collect_job(client, job, timeout=60)[-1]
                assert (last.type, last["code"]) == ("error", "storage")
                assert "/" not in last["message"].replace("read-only", "")  # no server path in it
                status = client.status(job)
                assert status["state"] == "failed" and status["error"]["code"] == "storage"
                assert client.hello()["queue"]["running"] is None
                with Client(server.address, timeout=10) as other:  # a replay ends too, not waiting forever
                    other.fetch(job)
                    replayed = collect_job(other, job, timeout=10)
                    assert (replayed[-1].type, replayed[-1]["code"]) == ("error", "storage")
                # A new submit on the full disk is refused with the same code, not `internal`.
                with pytest.raises(Exception) as refused:
                    client.submit(masks=tiny_masks, params=SLOW_PARAMS)
                assert getattr(refused.value, "code", None) == "storage"
        finally:
            server.stop()
