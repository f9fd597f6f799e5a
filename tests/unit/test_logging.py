"""The log allow-list: patient data bound by mistake never reaches the output."""

from __future__ import annotations

import io
import json
import logging

import pytest

from triage_node.logging import configure_logging, get_logger

SENTINELS = {
    "patient_name": "SENTINEL^NAME^LOGTEST",
    "patient_id": "SENTINEL-ID-778899",
    "accession_number": "SENTINELACC42",
    "study_instance_uid": "1.2.826.0.1.3680043.99999.424242",
}


def test_unlisted_keys_are_dropped_and_named() -> None:
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    get_logger("t").info("study received", study_key="s-abc", stage="receive", **SENTINELS)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["study_key"] == "s-abc"
    assert line["event"] == "study received"
    text = stream.getvalue()
    for value in SENTINELS.values():
        assert value not in text
    assert sorted(line["dropped_keys"]) == sorted(SENTINELS)


def test_stdlib_loggers_pass_through_the_same_filter() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    logging.getLogger("thirdparty").warning("hello", extra={"patient_id": "SENTINEL-ID-1"})
    text = stream.getvalue()
    assert "hello" in text
    assert "SENTINEL-ID-1" not in text


def test_a_failing_log_stream_prints_no_record_and_no_exception_message(
        capsys: pytest.CaptureFixture[str]) -> None:
    """When the log stream fails, stderr gets one line naming the failure: not the record,
    nor the exception being handled when it was made (its message may quote received values),
    which the standard handler prints with its traceback."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    stream.close()
    try:
        raise RuntimeError(SENTINELS["patient_name"])
    except RuntimeError:
        get_logger("t").error("association aborted: internal error", error="RuntimeError",
                              patient_id=SENTINELS["patient_id"])
    err = capsys.readouterr().err
    assert "triage-node: a log record could not be written (ValueError)" in err
    for value in SENTINELS.values():
        assert value not in err
    assert "association aborted" not in err


def _raise_with(value: str) -> None:
    try:
        int(value)  # ValueError: invalid literal for int() with base 10: '<value>'
    except ValueError as exc:
        raise RuntimeError(f"cannot read {value}") from exc


def test_an_exception_is_logged_with_its_frames_and_types_but_not_its_messages() -> None:
    """``log.exception`` and a third-party logger's exception both keep the traceback's frames
    and the exception types of the whole chain; the messages, which here quote a patient
    name as a parser's would, are withheld."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    name = SENTINELS["patient_name"]
    try:
        _raise_with(name)
    except RuntimeError:
        get_logger("t").exception("study processing crashed", stage="process")
        logging.getLogger("thirdparty").exception("callback failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["study processing crashed", "callback failed"]
    for line in lines:
        trace = line["exception"]
        assert trace.count("Traceback (most recent call last):") == 2
        assert "builtins.ValueError (message withheld)" in trace
        assert "builtins.RuntimeError (message withheld)" in trace
        assert trace.index("ValueError") < trace.index("RuntimeError")  # oldest first
        assert "in _raise_with" in trace and "test_logging.py" in trace
    assert name not in stream.getvalue()
