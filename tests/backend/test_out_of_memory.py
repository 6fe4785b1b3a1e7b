"""Running out of memory ends the job with advice, not the server: the worker's memory budget is set
below what a job needs, so the same recovery code that handles a CUDA out-of-memory runs on CPU."""

from __future__ import annotations

from backend_helpers import FAST_PARAMS, collect_job, start_server

from backend.client import Client

# The tiny model's estimate for the fast job is about 0.16 MB with 16 tokens and 0.6 MB with 64.
BUDGET = 300_000


def test_a_job_over_the_memory_budget_fails_with_advice_and_the_next_one_runs(tiny_pipeline, tiny_masks, tmp_path):
    big = {**FAST_PARAMS, "num_tokens": 64}
    from com4d.pipeline import ReconstructionParams

    assert tiny_pipeline.estimate_memory(2, ReconstructionParams.from_dict(big)) > BUDGET
    assert tiny_pipeline.estimate_memory(2, ReconstructionParams.from_dict(FAST_PARAMS)) < BUDGET
    server = start_server(tiny_pipeline, tmp_path / "store", memory_budget=BUDGET)
    try:
        with Client(server.address, timeout=10) as client:
            job = client.submit(masks=tiny_masks, params=big)
            last = collect_job(client, job)[-1]
            assert (last.type, last["code"], last["job"]) == ("error", "out_of_memory", job)
            assert "GiB" in last["message"]  # the pipeline's own sentence: how much it needs
            assert "fewer tokens" in last["advice"] and "fewer frames" in last["advice"]
            status = client.status(job)
            assert status["state"] == "failed" and status["error"]["advice"] == last["advice"]

            assert client.ping()["busy"] is False

            # The advice works: fewer tokens fit the same budget.
            assert collect_job(client, client.submit(masks=tiny_masks, params=FAST_PARAMS))[-1].type == "done"
    finally:
        server.stop()


def test_a_client_budget_cannot_raise_the_servers(tiny_pipeline, tiny_masks, tmp_path):
    server = start_server(tiny_pipeline, tmp_path / "store", memory_budget=BUDGET)
    try:
        with Client(server.address, timeout=10) as client:
            params = {**FAST_PARAMS, "num_tokens": 64, "memory_budget": 10**12}
            last = collect_job(client, client.submit(masks=tiny_masks, params=params))[-1]
            assert last["code"] == "out_of_memory"
    finally:
        server.stop()
