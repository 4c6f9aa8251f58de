"""Fake web access logs: realistic enough for Kibana, cheap enough for load tests.

Faker is slow (tens of microseconds per call), so every pool of values it provides (client IPs,
user agents, referrers, virtual hosts) is built once at construction; each log then only samples
those pools with ``random.choices`` and precomputed cumulative weights. ``batch(n)`` samples
whole columns at once (``k=n``), which is where most of the speed comes from.

``seed`` makes the *content* reproducible. The ``log_id`` never is: it is the Elasticsearch
document id, so two runs with the same seed must still produce new ids, otherwise the second
run's logs would be silently answered 409 (already indexed) and lost.

Output fields (the index mapping in ``logpipe.admin`` must match them):

=================  ==========  ===========================================================
log_id             str         UUIDv7, time-ordered, from the clock + ``os.urandom``
timestamp          str         UTC ISO-8601 with milliseconds and ``Z``
client_ip          str         IPv4 mostly, about 10 % IPv6
method             str         GET, POST, PUT, DELETE, HEAD, PATCH
endpoint           str         path from a fixed site map, Zipf-like popularity
http_version       str         HTTP/1.0, HTTP/1.1, HTTP/2.0
status             int         weighted: mostly 2xx/3xx, some 4xx/5xx
bytes              int         response body size, 0 for 204/304 and HEAD
response_time_ms   float       3 decimals, log-normal, slower for 5xx
user_agent         str         browsers, a few bots and CLI clients
referrer           str         ``-`` (direct), internal page, search engine or external URL
host               str         virtual host that served the request
=================  ==========  ===========================================================
"""

from __future__ import annotations

import itertools
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from faker import Faker

FIELDS: tuple[str, ...] = (
    "log_id", "timestamp", "client_ip", "method", "endpoint", "http_version", "status", "bytes",
    "response_time_ms", "user_agent", "referrer", "host",
)

# Site map: (path, kind). Popularity follows the list order (Zipf, s=1.1), so the home page and
# static assets dominate, as on a real site.
_SITE_PATHS: tuple[tuple[str, str], ...] = (
    ("/", "page"), ("/static/css/main.css", "asset"), ("/static/js/app.js", "asset"),
    ("/favicon.ico", "asset"), ("/products", "page"), ("/api/v1/products", "api"),
    ("/search", "page"), ("/api/v1/cart", "api"), ("/login", "form"), ("/cart", "page"),
    ("/static/img/logo.png", "asset"), ("/api/v1/recommendations", "api"), ("/checkout", "form"),
    ("/api/v1/session", "api"), ("/account", "page"), ("/blog", "page"), ("/about", "page"),
    ("/contact", "form"), ("/api/v1/orders", "api"), ("/help/faq", "page"),
    ("/robots.txt", "asset"), ("/sitemap.xml", "asset"), ("/api/v1/health", "api"),
    ("/logout", "form"), ("/register", "form"), ("/api/v1/users/me", "api"),
    ("/admin", "page"), ("/wp-login.php", "page"), ("/.env", "asset"),
)
_PRODUCT_PAGES = 40  # /products/<n> detail pages appended after the fixed site map

_METHODS_BY_KIND: dict[str, tuple[tuple[str, float], ...]] = {
    "page": (("GET", 97.0), ("HEAD", 3.0)),
    "asset": (("GET", 95.0), ("HEAD", 5.0)),
    "form": (("GET", 55.0), ("POST", 45.0)),
    "api": (("GET", 60.0), ("POST", 25.0), ("PUT", 7.0), ("DELETE", 5.0), ("PATCH", 3.0)),
}

_STATUS_WEIGHTS: tuple[tuple[int, float], ...] = (
    (200, 72.0), (201, 2.0), (204, 1.5), (206, 0.5), (301, 2.0), (302, 3.5), (304, 8.0),
    (400, 2.0), (401, 1.5), (403, 1.0), (404, 4.0), (405, 0.2), (429, 0.5),
    (500, 0.8), (502, 0.3), (503, 0.2), (504, 0.2),
)

_HTTP_VERSIONS: tuple[tuple[str, float], ...] = (
    ("HTTP/1.1", 58.0), ("HTTP/2.0", 38.0), ("HTTP/1.0", 4.0),
)

_EXTRA_AGENTS: tuple[str, ...] = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "Wget/1.21.4",
)

_SEARCH_REFERRERS: tuple[str, ...] = (
    "https://www.google.com/", "https://www.bing.com/", "https://duckduckgo.com/",
)

# Pool sizes: large enough for realistic cardinality, small enough to build in well under 1 s.
_IP_POOL = 5000
_IPV6_SHARE = 0.1
_AGENT_POOL = 300
_EXTERNAL_REFERRER_POOL = 200
_HOST_POOL = 3


def _zipf_cum_weights(n: int, s: float = 1.1) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank ** s) for rank in range(1, n + 1)))


class _UUIDv7Source:
    """RFC 9562 UUIDv7 with a 12-bit sub-millisecond counter (method 1), so ids made by one
    process are strictly increasing even when thousands fall into one millisecond.

    The random part comes from ``os.urandom``, never from the seeded content RNG.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = 0

    def next_ids(self, n: int) -> list[str]:
        noise = os.urandom(8 * n)
        ids: list[str] = []
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            for i in range(n):
                if now_ms > self._last_ms:
                    self._last_ms = now_ms
                    # Start the counter low with a random offset: leaves room for ~3000 more
                    # ids in this millisecond before borrowing from the next one.
                    self._seq = noise[8 * i] & 0x3FF
                else:
                    self._seq += 1
                    if self._seq > 0xFFF:  # counter exhausted: move into the next millisecond
                        self._last_ms += 1
                        self._seq = 0
                rand_b = int.from_bytes(noise[8 * i:8 * i + 8], "big") & 0x3FFF_FFFF_FFFF_FFFF
                value = ((self._last_ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) \
                    | (self._seq << 64) | (0b10 << 62) | rand_b
                h = f"{value:032x}"
                ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
        return ids


# One source per process keeps ids ordered across every generator in it.
_IDS = _UUIDv7Source()


def new_log_id() -> str:
    """A fresh UUIDv7 string (time-ordered, random part from the OS)."""
    return _IDS.next_ids(1)[0]


def format_timestamp(epoch_ms: int) -> str:
    """``1795514400123`` -> ``2026-11-24T10:00:00.123Z`` (UTC, milliseconds)."""
    seconds, millis = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class LogGenerator:
    """Fake access logs. ``seed`` reproduces content (not ids nor timestamps).

    ``max_jitter_ms`` moves each event time up to that far into the past, like logs that reach
    the shipper a little late; 0 makes every timestamp "now".
    """

    def __init__(self, seed: int | None = None, max_jitter_ms: int = 250) -> None:
        if max_jitter_ms < 0:
            raise ValueError("max_jitter_ms must not be negative")
        self._rng = random.Random(seed)
        self._max_jitter_ms = max_jitter_ms
        fake = Faker()
        fake.seed_instance(self._rng.getrandbits(64))

        n_v6 = int(_IP_POOL * _IPV6_SHARE)
        ips = [fake.ipv4_public() for _ in range(_IP_POOL - n_v6)]
        ips += [fake.ipv6() for _ in range(n_v6)]
        self._rng.shuffle(ips)
        self._ips = ips
        # Some clients are far busier than others (crawlers, NAT gateways).
        self._ip_cum = _zipf_cum_weights(len(ips), s=0.8)

        agents = [fake.user_agent() for _ in range(_AGENT_POOL)] + list(_EXTRA_AGENTS)
        self._agents = agents
        self._agent_cum = _zipf_cum_weights(len(agents), s=0.7)

        self._hosts = [fake.unique.domain_name() for _ in range(_HOST_POOL)]
        self._host_cum = _zipf_cum_weights(len(self._hosts), s=1.5)

        paths = list(_SITE_PATHS) + [(f"/products/{1000 + i}", "page")
                                     for i in range(_PRODUCT_PAGES)]
        path_weights = [1.0 / (rank ** 1.1) for rank in range(1, len(paths) + 1)]
        # One draw picks (endpoint, method) together, so POST only hits forms and the API.
        self._requests: list[tuple[str, str, str]] = []
        request_weights: list[float] = []
        for (path, kind), weight in zip(paths, path_weights, strict=True):
            for method, method_weight in _METHODS_BY_KIND[kind]:
                self._requests.append((path, method, kind))
                request_weights.append(weight * method_weight)
        self._request_cum = list(itertools.accumulate(request_weights))

        internal = [f"https://{host}{path}" for host in self._hosts for path, _ in paths[:20]]
        external = [fake.url() for _ in range(_EXTERNAL_REFERRER_POOL)]
        self._referrers = ["-", *_SEARCH_REFERRERS, *internal, *external]
        self._referrer_weights = ([40.0] + [8.0] * len(_SEARCH_REFERRERS)
                                  + [30.0 / len(internal)] * len(internal)
                                  + [6.0 / len(external)] * len(external))
        self._referrer_cum = list(itertools.accumulate(self._referrer_weights))

        self._statuses = [s for s, _ in _STATUS_WEIGHTS]
        self._status_cum = list(itertools.accumulate(w for _, w in _STATUS_WEIGHTS))
        self._versions = [v for v, _ in _HTTP_VERSIONS]
        self._version_cum = list(itertools.accumulate(w for _, w in _HTTP_VERSIONS))

        # Timestamps: formatting the seconds part is the slow bit; cache it per second.
        self._ts_second = -1
        self._ts_prefix = ""

    def _timestamp(self, epoch_ms: int) -> str:
        seconds, millis = divmod(epoch_ms, 1000)
        if seconds != self._ts_second:
            self._ts_second = seconds
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{self._ts_prefix}.{millis:03d}Z"

    def batch(self, n: int) -> list[dict[str, Any]]:
        """``n`` logs; columns are sampled together, which is much faster than n x generate()."""
        if n <= 0:
            return []
        rng = self._rng
        choices = rng.choices
        ids = _IDS.next_ids(n)
        now_ms = time.time_ns() // 1_000_000
        ips = choices(self._ips, cum_weights=self._ip_cum, k=n)
        requests = choices(self._requests, cum_weights=self._request_cum, k=n)
        statuses = choices(self._statuses, cum_weights=self._status_cum, k=n)
        versions = choices(self._versions, cum_weights=self._version_cum, k=n)
        agents = choices(self._agents, cum_weights=self._agent_cum, k=n)
        referrers = choices(self._referrers, cum_weights=self._referrer_cum, k=n)
        hosts = choices(self._hosts, cum_weights=self._host_cum, k=n)
        jitter = self._max_jitter_ms
        rand = rng.random
        gauss = rng.gauss  # exp(gauss) is a log-normal draw, several times faster than
        exp = math.exp      # random.lognormvariate (which uses the rejection-based normal)

        def lognorm(mu: float, sigma: float) -> float:
            return exp(gauss(mu, sigma))

        out: list[dict[str, Any]] = []
        for i in range(n):
            endpoint, method, kind = requests[i]
            status = statuses[i]
            if method == "POST" and status == 200 and kind == "api" and rand() < 0.3:
                status = 201
            out.append({
                "log_id": ids[i],
                "timestamp": self._timestamp(now_ms - int(rand() * jitter) if jitter else now_ms),
                "client_ip": ips[i],
                "method": method,
                "endpoint": endpoint,
                "http_version": versions[i],
                "status": status,
                "bytes": _body_bytes(kind, method, status, lognorm),
                "response_time_ms": _response_time(kind, status, lognorm),
                "user_agent": agents[i],
                "referrer": referrers[i],
                "host": hosts[i],
            })
        return out

    def generate(self) -> dict[str, Any]:
        """One log."""
        return self.batch(1)[0]

    def messages(self, n: int) -> list[tuple[bytes, bytes]]:
        """Producer fast path: ``(key, value)`` pairs; key = log_id, value = JSON (orjson)."""
        dumps = orjson.dumps
        return [(doc["log_id"].encode("ascii"), dumps(doc)) for doc in self.batch(n)]


# ln of the median body size per kind of endpoint (assets ~22 kB, API answers ~2 kB).
_BODY_LOG_MEDIAN = {"asset": 10.0, "page": 9.5, "form": 8.5, "api": 7.5}


_LogNormal = Callable[[float, float], float]


def _body_bytes(kind: str, method: str, status: int, lognorm: _LogNormal) -> int:
    if status in (204, 304) or method == "HEAD":
        return 0
    if status >= 300:
        # Redirects and error pages are small.
        return int(lognorm(6.0, 0.5))
    return int(lognorm(_BODY_LOG_MEDIAN[kind], 1.0))


def _response_time(kind: str, status: int, lognorm: _LogNormal) -> float:
    if kind == "asset" or status == 304:
        mu = 1.0  # ~3 ms: served from cache or disk
    elif status >= 500:
        mu = 6.5  # ~650 ms: timeouts and upstream failures dominate
    elif kind == "api":
        mu = 3.5
    else:
        mu = 4.0
    return round(lognorm(mu, 0.8), 3)


def sample(seed: int | None, n: int) -> Sequence[dict[str, Any]]:
    """Convenience for tests and the REPL: ``n`` logs from a fresh generator."""
    return LogGenerator(seed).batch(n)
