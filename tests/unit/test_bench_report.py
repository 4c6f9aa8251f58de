"""The benchmark's figures and report (bench/measure.py, bench/report.py, bench/scaling.py): the
pure parts, and the streamed ceiling against a local HTTP server."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from bench import measure, peer, report, scaling


def test_about_31_logs_a_second_are_followed_whatever_the_rate() -> None:
    # 1 in 32 at 1,000 logs/s (the recorded runs' sampling), 1 in 128 at 5,000.
    assert measure.sample_share(1000) == 8
    assert measure.sample_share(5000) == 2
    assert measure.sample_share(10) == 256
    assert measure.sample_share(1_000_000) == 1
    ids = [f"0190b5d2-7c4e-7abc-8def-0123456789{b:02x}" for b in range(256)]
    assert sum(measure.sampled(i, 8) for i in ids) == 8
    assert sum(measure.sampled(i, 2) for i in ids) == 2


def test_a_group_is_ready_when_stable_and_every_member_owns_part_of_the_topic() -> None:
    def a(*parts: int, topic: str = "t") -> list[tuple[str, int]]:
        return [(topic, p) for p in parts]

    assert measure.group_ready(True, [a(0, 1, 2, 3)], "t", 4, members=1)
    assert measure.group_ready(True, [a(0, 2), a(1, 3)], "t", 4, members=2)
    assert not measure.group_ready(False, [a(0, 1, 2, 3)], "t", 4, members=1)  # rebalancing
    assert not measure.group_ready(True, [a(0, 1, 2, 3), a()], "t", 4, members=2)  # idle member
    assert not measure.group_ready(True, [a(0, 1), a(2)], "t", 4, members=2)  # 3 unowned
    assert not measure.group_ready(True, [a(0, 1, 2, 3)], "t", 4, members=2)  # one missing
    assert not measure.group_ready(True, [a(0, 1, 2, 3, topic="other")], "t", 4, members=1)


def test_window_rate() -> None:
    assert measure.window_rate(30_000, 100.0, 102.0) == 15_000
    assert math.isnan(measure.window_rate(30_000, 102.0, 102.0))
    assert math.isnan(measure.window_rate(0, 100.0, 102.0))


class _SlowBulk(BaseHTTPRequestHandler):
    lock = threading.Lock()
    active = 0
    most = 0
    bodies: ClassVar[list[bytes]] = []  # a fresh list per server (the fixture)

    def do_POST(self) -> None:
        cls = type(self)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with cls.lock:
            cls.active += 1
            cls.most = max(cls.most, cls.active)
        time.sleep(0.02)
        with cls.lock:
            cls.active -= 1
            cls.bodies.append(body)
        answer = b'{"errors":false}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def bulk_server() -> Iterator[tuple[int, type[_SlowBulk]]]:
    handler = type("Handler", (_SlowBulk,), {"active": 0, "most": 0, "bodies": []})
    handler.protocol_version = "HTTP/1.1"  # persistent connections, like Elasticsearch
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("inflight", [1, 2, 4])
def test_the_streamed_ceiling_keeps_n_requests_in_flight_and_posts_each_body_once(
        bulk_server: tuple[int, type[_SlowBulk]], inflight: int) -> None:
    port, handler = bulk_server
    messages = [(f"id-{i:04d}".encode(),
                 b'{"timestamp":"2026-11-24T10:00:00.000Z","n":' + str(i).encode() + b"}")
                for i in range(24 * 10)]
    bodies = [b[0] for b in measure.build_bodies(messages, "bench-x", 10, 1)]
    figures = measure.bulk_ceiling_streams(port, bodies, inflight, None)
    assert figures.docs == 240 and figures.errors == 0
    assert sorted(handler.bodies) == sorted(bodies)
    assert handler.most == inflight


def _latency(p50: float, p99: float, rate: float = 1000.0) -> dict[str, Any]:
    return {"p50_s": p50, "p90_s": p99 - 0.1, "p99_s": p99, "max_s": p99 + 0.2,
            "samples": 1000, "rate": rate, "indexed_p50_s": 0.2, "indexed_p99_s": 0.4,
            "not_seen": 0}


def test_results_keys_of_both_latency_runs_and_of_the_scaling_line() -> None:
    rows = [dataclass_row(1, 15_000.0, [16_000.0, 18_000.0]),
            dataclass_row(2, float("nan"), [20_000.0, 22_000.0])]
    flat = report.flatten({"latency": _latency(0.9, 1.6),
                           "latency_5k": _latency(1.0, 1.9, 5000.0), "scaling": rows})
    assert flat["e2e_p99_s"] == 1.6 and flat["e2e_p50_s"] == 0.9
    assert flat["e2e_p99_5k_s"] == 1.9 and flat["e2e_p50_5k_s"] == 1.0
    assert flat["e2e_rate_5k_logs_per_s"] == 5000.0
    assert flat["scaling"] == [
        {"consumers": 1, "inflight": 1, "consumer_docs_per_s": 15_000.0,
         "ceiling_docs_per_s": 17_000.0, "ratio": 0.882, "hwm_mib": 70.0},
        {"consumers": 2, "inflight": 2, "consumer_docs_per_s": None,
         "ceiling_docs_per_s": 21_000.0, "ratio": None, "hwm_mib": 70.0}]


def dataclass_row(n: int, docs_per_s: float, ceilings: list[float]) -> dict[str, Any]:
    return dataclasses.asdict(scaling.row(n, docs_per_s, ceilings, hwm_mib=70.0))


def test_targets_say_met_or_not_with_the_ratio_to_the_bound() -> None:
    flat = {"consumer_ratio": 0.63, "consumer_vs_rsyslog": 1.25, "e2e_p99_s": 1.6,
            "e2e_p99_5k_s": 1.5, "consumer_rss_mib": 75.0}
    got = {t[0]: t[1:] for t in report.targets(flat)}
    assert got["consumer / raw bulk ceiling (Elasticsearch on its own core)"] == (
        ">= 0.9x", "0.63x", "0.70 of the floor", "NOT met")
    assert got["consumer / raw bulk ceiling (all sharing the cores)"][-1] == "not measured"
    assert got["consumer / rsyslog, steady docs/s"][-1] == "met"
    assert got["end-to-end p99 at 1,000 logs/s"] == ("<= 1.5 s", "1.600 s",
                                                      "1.07 of the ceiling", "NOT met")
    assert got["end-to-end p99 at 5,000 logs/s"] == ("<= 2 s", "1.500 s", "0.75 of the ceiling",
                                                      "met")
    assert got["consumer peak RSS"] == ("<= 100 MiB", "75.0 MiB", "0.75 of the ceiling", "met")
    assert got["producer / pre-built produce loop"][-1] == "not measured"
    assert report.missing(flat) == ["rsyslog_docs_per_s", "rsyslog_lost", "consumer_lost"]
    text = report.targets_text(flat)
    assert "not measured in this run: rsyslog_docs_per_s, rsyslog_lost, consumer_lost" in text


def test_the_peer_keys_carry_both_sinks_latency() -> None:
    figures = {"rsyslog_docs_per_s": 20_000.0, "consumer_docs_per_s": 24_000.0,
               "consumer_vs_rsyslog": 1.2, "backlog": 100_000,
               "latency": {"rsyslog": _latency(0.7, 1.3), "logpipe": _latency(0.9, float("nan"))}}
    flat = peer.flat(figures)
    assert flat["rsyslog_e2e_p50_s"] == 0.7 and flat["rsyslog_e2e_p99_s"] == 1.3
    assert flat["peer_consumer_e2e_p50_s"] == 0.9 and flat["peer_consumer_e2e_p99_s"] is None
