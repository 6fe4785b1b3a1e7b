"""docs/protocol.md and backend/protocol.py describe the same protocol."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from backend import protocol

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def section(direction_title: str) -> str:
    start = DOC.index(direction_title)
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else len(DOC)]


def test_every_request_and_reply_type_has_its_own_section():
    requests = set(re.findall(r"^### (\w+)$", section("## 4. Client → server"), re.M))
    replies = set(re.findall(r"^### (\w+)$", section("## 5. Server → client"), re.M))
    assert requests == set(protocol.REQUESTS)
    assert replies == set(protocol.REPLIES)


def test_every_field_of_every_message_is_documented_in_its_section():
    for title, schemas in (("## 4. Client → server", protocol.REQUESTS), ("## 5. Server → client", protocol.REPLIES)):
        text = section(title)
        for type_, fields in schemas.items():
            start = text.index(f"### {type_}\n")
            end = text.find("\n### ", start + 1)
            body = text[start : end if end != -1 else len(text)]
            for name in fields:
                assert f"`{name}`" in body, f"{type_}.{name} is not documented"


def test_every_error_code_is_in_the_table_and_the_version_matches():
    table = section("## 6. Job life cycle and error codes")
    for code in protocol.ERROR_CODES:
        assert f"| `{code}` |" in table, code
    assert f"version {protocol.PROTOCOL_VERSION}" in DOC.splitlines()[0]
    assert set(protocol.WIRE_DTYPES) == set(re.findall(r"`(float32|int32|uint8|int64)`", section("## 2.")))


def test_the_parameter_table_is_the_schemas():
    from backend.params_doc import with_table

    assert with_table(DOC) == DOC, "docs/protocol.md's parameter table is stale: run python -m backend.params_doc"


def examples(title: str) -> dict[str, list[dict]]:
    """The JSON examples of a section, by message type."""
    found: dict[str, list[dict]] = {}
    for block in re.findall(r"```json\n(.*?)```", section(title), re.S):
        example = json.loads(block)
        found.setdefault(example["type"], []).append(example)
    return found


def as_message(example: dict) -> protocol.Message:
    """The example as the decoder would hand it over: arrays of the declared dtype and shape."""
    arrays = {a["name"]: np.zeros(a["shape"], protocol.WIRE_DTYPES[a["dtype"]]) for a in example.get("arrays", [])}
    files = {f["name"]: b"\0" * f["size"] for f in example.get("files", [])}
    fields = {k: v for k, v in example.items() if k not in protocol.RESERVED_KEYS}
    return protocol.Message(example["type"], example["id"], fields, arrays, files, example["v"])


def test_every_example_is_valid_for_its_schema():
    requests, replies = examples("## 4. Client → server"), examples("## 5. Server → client")
    assert set(requests) == set(protocol.REQUESTS) and set(replies) == set(protocol.REPLIES)
    for direction, found in (("request", requests), ("reply", replies)):
        for items in found.values():
            for example in items:
                protocol.validate(as_message(example), direction)


def test_the_reply_examples_have_the_fields_the_server_really_sends(server, client, tiny_masks):
    """One real job and one request of each kind; every reply type's example must carry exactly the
    fields the server sent (and the maps of `hello` exactly the keys the server sent)."""
    from backend_helpers import FAST_PARAMS, SLOW_PARAMS, wait_for

    real: dict[str, protocol.Message] = {}
    real["hello"] = client.request("hello")
    real["pong"] = client.request("ping")
    job = client.submit(masks=tiny_masks, params=FAST_PARAMS, label="doc")
    events = list(client.job_events(job, timeout=120))
    for message in events:
        real.setdefault(message.type, message)
    real["job_status"] = client.request("status", {"job": job})
    real["jobs"] = client.request("list_jobs")
    real["file_list"] = client.request("list_files", {"job": job})
    real["file"] = client.request("get_file", {"job": job, "path": "scene.json"})
    slow = client.submit(masks=tiny_masks, params=SLOW_PARAMS)
    wait_for(client, slow, lambda m: m.type == "progress" and m["stage"] == "stage_a")
    other_rid = client.send("fetch", {"job": slow, "follow": False})
    replay = [m for m in client.job_events(slow, timeout=30) if m.id == other_rid]
    real["replay_end"] = replay[-1]
    client.cancel(slow)
    real["error"] = [m for m in client.job_events(slow, timeout=30) if m.type == "error"][-1]
    accepted_rid = client.send("submit", {"resubmit": job})
    real["accepted"] = next(m for m in client.messages(idle_timeout=10) if m.id == accepted_rid)

    documented = examples("## 5. Server → client")
    for type_, message in real.items():
        example = documented[type_][0]
        keys = set(example) - protocol.RESERVED_KEYS
        assert keys == set(message.fields), (
            f"{type_}: the example has {sorted(keys)}, the server sent {sorted(message.fields)}"
        )
        assert [a["name"] for a in example.get("arrays", [])] == list(message.arrays), type_
        assert [f["name"] for f in example.get("files", [])] == list(message.files), type_
    assert {"progress", "mesh", "done"} <= set(real)
    hello = documented["hello"][0]
    for name in ("queue", "limits", "store"):
        assert set(hello[name]) == set(real["hello"][name]), name
    assert set(real["hello"]["model"]) <= set(hello["model"])  # plus the GPU fields on CUDA
    assert set(hello["params"][0]) == set(real["hello"]["params"][0])
    progress = documented["progress"][0]
    assert real["progress"]["stage"] == "load" and real["progress"]["total"] == 0  # as documented
    stage_a = [m for m in events if m.type == "progress" and m["stage"] == "stage_a"]
    assert progress["stage"] == "stage_a" and (progress["window"], progress["windows"]) == (1, 1)
    assert stage_a and all((m["window"], m["windows"]) == (1, 1) and 1 <= m["step"] <= m["steps"] for m in stage_a)
