"""Correlation ids on log lines and redaction of bearer tokens, purchase tokens and JWTs."""

from __future__ import annotations

import io
import logging
import threading
import uuid

import pytest

from shared.observability import (
    CorrelationFilter,
    correlation,
    current_correlation_id,
    install_log_filter,
    new_correlation_id,
    redact,
)

# A JWT-shaped string (header.payload.signature, base64url); not a real token.
JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImFiYyJ9"
    ".eyJhdWQiOiIyMGU5NDBiMy00Yzc3LTRiMGItOWE1My05ZTE2YTFiMDEwYTciLCJ0aWQiOiJ4In0"
    ".c2lnbmF0dXJlLXBhcnQtb2YtdGhlLXRva2VuLXdpdGgtZW5vdWdoLWxlbmd0aA"
)
JWT_PAYLOAD, JWT_SIGNATURE = JWT.split(".")[1:]


@pytest.fixture
def capture():
    """A logger whose handler carries the CorrelationFilter, writing to a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(correlation_id)s|%(message)s"))
    handler.addFilter(CorrelationFilter())
    logger = logging.getLogger(f"test.observability.{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- correlation ids --------------------------------------------------------------------------


def test_correlation_id_on_every_line_inside_the_block(capture):
    logger, stream = capture
    with correlation("cid-123") as cid:
        assert cid == "cid-123"
        assert current_correlation_id() == "cid-123"
        logger.info("first")
        logger.warning("second %s", "arg")
    logger.info("outside")
    first, second, outside = lines(stream)
    assert first == "INFO cid-123|[cid=cid-123] first"
    assert second == "WARNING cid-123|[cid=cid-123] second arg"
    assert outside == "INFO |outside"  # no correlation outside a unit of work
    assert current_correlation_id() == ""


def test_generated_correlation_ids_are_unique_guids():
    with correlation() as first:
        pass
    with correlation() as second:
        pass
    assert first != second
    assert str(uuid.UUID(first)) == first
    assert str(uuid.UUID(new_correlation_id()))


def test_nested_correlation_restores_the_outer_id(capture):
    logger, stream = capture
    with correlation("outer"):
        with correlation("inner"):
            logger.info("a")
        logger.info("b")
    assert lines(stream) == ["INFO inner|[cid=inner] a", "INFO outer|[cid=outer] b"]


def test_correlation_id_restored_after_an_exception():
    with pytest.raises(RuntimeError), correlation("boom"):
        raise RuntimeError
    assert current_correlation_id() == ""


def test_threads_keep_their_own_correlation(capture):
    logger, stream = capture
    barrier = threading.Barrier(4)

    def work(name: str) -> None:
        with correlation(name):
            barrier.wait()
            logger.info("from %s", name)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = sorted(lines(stream))
    assert got == sorted(f"INFO t{i}|[cid=t{i}] from t{i}" for i in range(4))


def test_message_already_carrying_a_cid_is_not_prefixed_twice(capture):
    logger, stream = capture
    with correlation("abc"):
        logger.info("[cid=abc] explicit")
    assert lines(stream) == ["INFO abc|[cid=abc] explicit"]


def test_two_handlers_process_a_record_once():
    streams = [io.StringIO(), io.StringIO()]
    logger = logging.getLogger(f"test.observability.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    filt = CorrelationFilter()
    handlers = []
    for stream in streams:
        handler = logging.StreamHandler(stream)
        handler.addFilter(filt)
        logger.addHandler(handler)
        handlers.append(handler)
    try:
        with correlation("once"):
            logger.info("token=%s", "abc")
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
    for stream in streams:
        assert stream.getvalue() == "[cid=once] token=[redacted]\n"


def test_install_log_filter_is_idempotent_and_reaches_root_handlers(monkeypatch):
    import shared.observability as observability

    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    monkeypatch.setattr(observability, "_installed", False)
    try:
        install_log_filter()
        install_log_filter()
        assert sum(isinstance(f, CorrelationFilter) for f in handler.filters) == 1
        logger = logging.getLogger(f"test.observability.{uuid.uuid4().hex}")
        logger.setLevel(logging.INFO)
        with correlation("root-cid"):
            logger.info("Authorization: Bearer %s", JWT)
        assert stream.getvalue() == "[cid=root-cid] Authorization: Bearer [redacted]\n"
    finally:
        root.removeHandler(handler)
        for other in root.handlers:
            for filt in [f for f in other.filters if isinstance(f, CorrelationFilter)]:
                other.removeFilter(filt)


# --- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, secret, kept",
    [
        (f"Authorization: Bearer {JWT}", JWT_PAYLOAD, "Authorization: Bearer [redacted]"),
        (f"authorization: bearer {JWT}", JWT_SIGNATURE, "authorization: bearer [redacted]"),
        ("Bearer opaque_token-value.123~x", "opaque_token", "Bearer [redacted]"),
        # RFC 6750 b64token: '+' and '/' belong to the token too
        ("headers {'Authorization': 'Bearer ab+cd/ef==', 'x': 1}", "cd/ef", "'Bearer [redacted]', 'x': 1"),
        ("GET /landing?token=ab%2Bcd%2Fef%3D%3D&x=1", "ab%2Bcd", "?token=[redacted]&x=1"),
        ("GET /landing?TOKEN=ab+cd/ef== HTTP/1.1", "ab+cd", "?TOKEN=[redacted] HTTP/1.1"),
        ("POST /api/resolve?api-version=1&token=secretvalue", "secretvalue", "api-version=1&token=[redacted]"),
        ("next continuationToken=opaque+value/x&api-version=2018-08-31", "opaque+value", "&api-version=2018-08-31"),
        ("x-ms-marketplace-token: ab+cd/ef==", "ab+cd", "x-ms-marketplace-token: [redacted]"),
        ("{'x-ms-marketplace-token': 'ab+cd/ef==', 'y': 2}", "ab+cd", "'y': 2"),
        (f"got {JWT} from somewhere", JWT_PAYLOAD, "got eyJ"),
        (f"got {JWT} from somewhere", JWT_SIGNATURE, "from somewhere"),
    ],
)
def test_redact(text, secret, kept):
    redacted = redact(text)
    assert secret not in redacted
    assert kept in redacted
    assert "[redacted]" in redacted


def test_redact_leaves_ordinary_text_alone():
    text = "subscription 37f9dea2-4345-438f-b0bd-03d40d28c7e0 moved to Subscribed (request 1234, plan basic)"
    assert redact(text) == text


def test_log_lines_are_redacted(capture):
    logger, stream = capture
    with correlation("cid-r"):
        logger.info("calling with Authorization: Bearer %s", JWT)
        logger.info("landing %s", "https://app.example/landing?token=ab%2Bcd%2Fef%3D%3D")
        logger.info("raw jwt %s in text", JWT)
        logger.info({"Authorization": "Bearer " + JWT})  # non-string messages too
    output = stream.getvalue()
    assert JWT_PAYLOAD not in output
    assert JWT_SIGNATURE not in output
    assert "ab%2Bcd" not in output
    assert output.count("[redacted]") == 4
    assert all(line.startswith("INFO cid-r|[cid=cid-r] ") for line in lines(stream))


def test_redaction_works_without_a_correlation(capture):
    logger, stream = capture
    logger.info("Bearer %s", JWT)
    assert lines(stream) == ["INFO |Bearer [redacted]"]
