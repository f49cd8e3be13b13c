"""Pure parts of monitoring: the dashboard's throughput series, nvidia-smi parsing, metric
helpers, and the logging setup (format, rotation, journal, levels, request-id isolation)."""

from __future__ import annotations

import logging
import os
import re

import pytest

from ollama_server.core.schemas import RequestState, RequestStatus
from ollama_server.logs import (
    LOG_FORMAT,
    JournalFormatter,
    connected_to_journal,
    console_handler,
    isolate_request_context,
    request_id_var,
    setup_logging,
)
from ollama_server.metrics import (
    parse_apps_csv,
    parse_gpu_csv,
    split_active,
    throughput_series,
    vllm_finished_reason,
)


def status(first: float | None, end: float | None, tokens: int,
           state: RequestState = RequestState.COMPLETED, reason: str | None = "stop"
           ) -> RequestStatus:
    s = RequestStatus(id="r", model="m", dialect="openai", started=0.0)
    s.first_token_at, s.finished_at, s.tokens_generated = first, end, tokens
    s.state, s.finish_reason = state, reason
    return s


@pytest.mark.parametrize("statuses, expected", [
    ([], [0.0, 0.0, 0.0]),
    # 20 tokens over [10, 20): 2 tok/s in the middle slice.
    ([status(10.0, 20.0, 20)], [0.0, 2.0, 0.0]),
    # Straddles two slices: 5 s in each.
    ([status(15.0, 25.0, 10)], [0.0, 0.5, 0.5]),
    # Still running at now=30 (no end): counted up to now.
    ([status(20.0, None, 30, RequestState.GENERATING)], [0.0, 0.0, 3.0]),
    # Ended before the window, or never produced a token: not counted.
    ([status(-20.0, -1.0, 50), status(None, None, 0, RequestState.FAILED)], [0.0, 0.0, 0.0]),
    # All tokens at one instant (a non-streamed answer): all in that slice.
    ([status(12.0, 12.0, 7)], [0.0, 0.7, 0.0]),
    # Started before the window: only the part inside counts.
    ([status(-10.0, 10.0, 40)], [2.0, 0.0, 0.0]),
    # Two requests at once add up.
    ([status(0.0, 10.0, 10), status(0.0, 10.0, 30)], [4.0, 0.0, 0.0]),
])
def test_throughput_series(statuses, expected):
    assert throughput_series(statuses, now=30.0, window_s=30.0, bin_s=10.0) == expected


def test_throughput_series_default_shape():
    assert len(throughput_series([], now=1000.0)) == 60


def test_parse_gpu_csv():
    text = ("0, NVIDIA H100 80GB HBM3, 1234, 81559\n"
            "1, NVIDIA GeForce RTX 4090, Founders, 10, 24564\n"
            "garbage\n")
    devices = parse_gpu_csv(text)
    assert [(d.index, d.name, d.used_mib, d.total_mib) for d in devices] == [
        (0, "NVIDIA H100 80GB HBM3", 1234.0, 81559.0),
        (1, "NVIDIA GeForce RTX 4090, Founders", 10.0, 24564.0)]


def test_parse_gpu_csv_not_supported_values():
    (d,) = parse_gpu_csv("0, Jetson, [N/A], [N/A]")
    assert (d.used_mib, d.total_mib) == (0.0, 0.0)


def test_parse_apps_csv_sums_a_process_over_gpus():
    assert parse_apps_csv("4242, 500\n4242, 300\n77, [N/A]\n99, 12\n") == {4242: 800.0,
                                                                            99: 12.0}
    assert parse_apps_csv("") == {}


@pytest.mark.parametrize("state, reason, expected", [
    (RequestState.COMPLETED, "stop", "stop"),
    (RequestState.COMPLETED, "stop_sequence", "stop"),
    (RequestState.COMPLETED, "tool_calls", "stop"),
    (RequestState.COMPLETED, "length", "length"),
    (RequestState.FAILED, None, "abort"),
    (RequestState.CANCELLED, None, "abort"),
])
def test_vllm_finished_reason(state, reason, expected):
    assert vllm_finished_reason(status(0.0, 1.0, 1, state, reason)) == expected


def test_split_active():
    states = [RequestState.QUEUED, RequestState.LOADING, RequestState.PROCESSING,
              RequestState.GENERATING]
    active = []
    for i, state in enumerate(states):
        s = RequestStatus(id=str(i), model="a" if i < 3 else "b", dialect="openai")
        s.state = state
        active.append(s)
    assert split_active(active) == ({"a": 1, "b": 1}, {"a": 2})


# --- logging -----------------------------------------------------------------------------

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (\S+) - (\w+) - \[(.*?)\] (.*)$")


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for handler in list(root.handlers):
        if getattr(handler, "_ollama_server", False):
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_log_file_line_format_and_request_id(tmp_path, restore_root):
    setup_logging("INFO", tmp_path, environ={})
    log = logging.getLogger("ollama_server.test")
    token = request_id_var.set("abc123")
    try:
        log.info("inside a request")
    finally:
        request_id_var.reset(token)
    log.info("outside")
    log.debug("hidden at INFO")
    for handler in restore_root.handlers:
        handler.flush()
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert [LINE.match(line).groups() for line in lines] == [
        ("ollama_server.test", "INFO", "abc123", "inside a request"),
        ("ollama_server.test", "INFO", "-", "outside")]


def test_debug_raises_the_level(tmp_path, restore_root):
    setup_logging("DEBUG", tmp_path, environ={})
    logging.getLogger("ollama_server.test").debug("now visible")
    for handler in restore_root.handlers:
        handler.flush()
    assert "DEBUG - [-] now visible" in (tmp_path / "server.log").read_text()


def test_log_file_rotates(tmp_path, restore_root):
    setup_logging("INFO", tmp_path, max_bytes=2000, backups=2, environ={})
    log = logging.getLogger("ollama_server.test")
    for i in range(200):
        log.info("line %d %s", i, "x" * 40)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["server.log", "server.log.1", "server.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())


def test_setup_is_idempotent(tmp_path, restore_root):
    setup_logging("INFO", tmp_path, environ={})
    setup_logging("INFO", tmp_path, environ={})
    ours = [h for h in restore_root.handlers if getattr(h, "_ollama_server", False)]
    assert len(ours) == 2  # console + file, not four


def test_journal_formatter_prefixes_priorities():
    fmt = JournalFormatter(LOG_FORMAT)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad\nsecond line", None, None)
    record.request_id = "r1"
    lines = fmt.format(record).splitlines()
    assert lines[0].startswith("<3>") and " - ERROR - [r1] bad" in lines[0]
    assert lines[1] == "<3>second line"
    record.levelno = logging.WARNING
    assert fmt.format(record).startswith("<4>")


def test_connected_to_journal(tmp_path):
    with open(tmp_path / "out", "w") as fh:
        st = os.fstat(fh.fileno())
        assert connected_to_journal(fh, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not connected_to_journal(fh, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not connected_to_journal(fh, {})


def test_console_handler_under_systemd_uses_stdout():
    import sys

    handler = console_handler({"INVOCATION_ID": "abc"})
    assert handler.stream is sys.stdout
    assert console_handler({}).stream is sys.stderr


def test_isolate_request_context_covers_the_body_and_does_not_leak():
    seen = []

    def app(environ, start_response):
        request_id_var.set(environ["rid"])

        def body():
            try:
                seen.append(request_id_var.get())
                yield b"a"
                seen.append(request_id_var.get())
                yield b"b"
            finally:
                seen.append("closed " + request_id_var.get())
        return body()

    wrapped = isolate_request_context(app)
    first = wrapped({"rid": "one"}, None)
    second = wrapped({"rid": "two"}, None)
    assert next(first) == b"a" and next(second) == b"a"
    assert next(first) == b"b"
    first.close()
    second.close()  # a client that went away: the generator's finally still sees its id
    assert seen == ["one", "two", "one", "closed one", "closed two"]
    assert request_id_var.get() == "-"
