"""HTTP(S) reads, for inputs that live on web servers (IIIF manifests and images): retries, a timeout, and a
limit on concurrent requests per server.

A museum's image server is not S3: it is often one machine that makes each image on request and answers 503
when busy. Every request here waits for one of its server's slots (`storage.http_max_per_server` at once, per
process: each Ray decode worker keeps its own count), retries connection errors, 429 and 5xx with exponential
backoff (a Retry-After header wins, as urllib3 does it), and gives up after `storage.http_timeout_s` without a
byte. A failed request raises FileNotFoundError (404, 410), `TooLarge`, `HTTPFailure` (an answer that is not
2xx) or `Unreachable` (no answer at all), each with a message that names the status, the server and the tries.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from artfuse.config import StorageConfig

HTTP_PREFIXES = ("http://", "https://")
RETRY_STATUSES = (429, 500, 502, 503, 504)
GONE = (404, 410)
CHUNK = 1 << 16
USER_AGENT = "artfuse (archive labelling; honours Retry-After)"


class HTTPFailure(OSError):
    """A request that ended without a 2xx answer after its retries."""


class TooLarge(HTTPFailure):
    """An answer with more bytes than the caller accepts."""


class Unreachable(HTTPFailure):
    """No answer from the server (refused, reset, timed out) after the retries: an outage, not the object's fault."""


@dataclass
class Answer:
    body: bytes
    headers: Mapping[str, str]  # case-insensitive


def is_http(uri: str) -> bool:
    return uri.startswith(HTTP_PREFIXES)


def get(uri: str, storage: StorageConfig | None = None, *, max_bytes: int | None = None) -> Answer:
    """GET `uri` with this process's per-server limit, retries and timeout; the body and headers of a 2xx answer."""
    cfg = storage or StorageConfig()
    server = urlsplit(uri).netloc
    session = _session(cfg.http_retries, cfg.http_backoff_s, cfg.http_max_per_server)
    with _server_slots(server, cfg.http_max_per_server):
        try:
            with session.get(uri, timeout=cfg.http_timeout_s, stream=True) as response:
                tries = 1 + len(response.raw.retries.history) if response.raw.retries else 1
                if response.status_code in GONE:
                    raise FileNotFoundError(f"HTTP {response.status_code} {response.reason} from {server}")
                if not response.ok:
                    raise HTTPFailure(
                        f"HTTP {response.status_code} {response.reason} from {server} after {_tries(tries)}"
                    )
                return Answer(_body(response, max_bytes, server), response.headers)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise Unreachable(
                f"no answer from {server} after {_tries(cfg.http_retries + 1)} ({type(e).__name__})"
            ) from e


def _body(response: requests.Response, max_bytes: int | None, server: str) -> bytes:
    declared = int(response.headers.get("Content-Length") or 0)
    if max_bytes is not None and declared > max_bytes:
        raise TooLarge(f"{declared} bytes from {server}, above data.max_bytes={max_bytes}")
    chunks, total = [], 0
    for chunk in response.iter_content(CHUNK):
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise TooLarge(f"more than {max_bytes} bytes from {server} (data.max_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _tries(n: int) -> str:
    return "1 try" if n == 1 else f"{n} tries"


@cache
def _session(retries: int, backoff_s: float, per_server: int) -> requests.Session:
    """One session per process and settings: connections to a server are kept and reused across requests."""
    retry = Retry(
        total=retries,
        backoff_factor=backoff_s,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer comes back, so its status can be reported
    )
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=per_server)
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _server_slots(server: str, per_server: int) -> threading.BoundedSemaphore:
    """The semaphore that bounds this process's concurrent requests to `server` (host:port)."""
    with _SLOTS_LOCK:  # two threads asking at once must get the same semaphore
        return _SLOTS.setdefault((server, per_server), threading.BoundedSemaphore(per_server))


_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}  # per process, like fsspec's filesystem cache
_SLOTS_LOCK = threading.Lock()
