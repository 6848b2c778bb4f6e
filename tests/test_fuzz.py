"""Property-based fuzzing of every parser with hypothesis.

./scripts/test runs 3,000 generated inputs per parser; ./scripts/fuzz runs 10,000 (or
PMEMBLK_FUZZ_EXAMPLES).

Whatever the bytes, a parser returns a valid message or raises its own error class (never
another exception), and what it accepts encodes back to the same fields.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmemblk import layout
from pmemblk import protocol as p
from pmemblk.errors import LayoutError, ProtocolError

EXPORT = 64 << 20
EXAMPLES = int(os.environ.get("PMEMBLK_FUZZ_EXAMPLES", "3000"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

VALID: dict[str, bytes] = {
    "hello": p.Hello(readonly=True).encode(),
    "welcome": p.Welcome(EXPORT, 4096, 1, 3, 7, 1 << 40, uuid.UUID(int=5), 4096, 8, 2).encode(),
    "challenge": p.Challenge(p.AUTH_HMAC_SHA256, bytes(range(32))).encode(),
    "auth": p.Auth(bytes(range(32))).encode(),
    "reject": p.Reject(16, "busy").encode(),
    "commit": p.Commit(9, ((0, 4096), (8192, 10))).encode(),
    "commit_reply": p.CommitReply(9, 0).encode(),
    "io": p.IORequest(p.MSG_WRITE, 3, 4096, 512).encode(),
    "reply": p.Reply(3, 0, 512).encode(),
    "header": layout.Header(uuid.UUID(int=1), 4096, 4096, EXPORT, 5).encode(),
}
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "hello": p.Hello.decode,
    "welcome": p.Welcome.decode,
    "challenge": p.Challenge.decode,
    "auth": p.Auth.decode,
    "reject": p.Reject.decode,
    "commit": lambda raw: p.Commit.decode(raw, EXPORT),
    "commit_reply": p.CommitReply.decode,
    "io": lambda raw: p.IORequest.decode(raw, EXPORT),
    "reply": p.Reply.decode,
    "header": lambda raw: layout.Header.decode(raw, EXPORT + 4096),
}
ERRORS = (ProtocolError, LayoutError)


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    """A valid message with random byte changes, truncation or extension."""
    raw = bytearray(VALID[name])
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw) + 8))
    return bytes(raw[:cut]) + (bytes(cut - len(raw)) if cut > len(raw) else b"")


def inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=128), mutated(name),
                     st.binary(min_size=8, max_size=128).map(
                         lambda b: p.MAGIC + p.PROTOCOL_VERSION.to_bytes(2, "little") + b))


def check(name: str, raw: bytes) -> None:
    try:
        msg = DECODERS[name](raw)
    except ERRORS:
        return
    again = DECODERS[name](msg.encode())
    assert again == msg  # what was accepted is a well-formed message


@pytest.mark.parametrize("name", list(DECODERS))
def test_parser_survives_generated_inputs(name: str) -> None:
    @FUZZ
    @given(inputs(name))
    def run(raw: bytes) -> None:
        check(name, raw)

    run()


@FUZZ
@given(st.binary(max_size=48))
def test_stream_frame_sizing_never_trusts_bad_lengths(raw: bytes) -> None:
    try:
        size = p.request_header_size(raw[:8])
        total, _ = p.parse_request_header(raw[:size], EXPORT)
    except ProtocolError:
        return
    assert p.HELLO.size <= total <= p.IO.size + p.MAX_IO
