"""docs/protocol.md and backend/protocol.py describe the same protocol."""

from __future__ import annotations

import re
from pathlib import Path

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
