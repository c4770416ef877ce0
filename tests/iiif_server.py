"""A real IIIF Image API server for tests and measurements: zimeon's reference implementation (PyPI `iiif`),
its `iiif_testserver.py` started on 127.0.0.1 over a folder of images. An image `name.jpg` in the folder is the
service `{base}/3.0_pil/name` (Image API 3.0; `2.1_pil` for 2.1). Its access log (one line per request, with the
path) goes to a file, so a test can see what was asked for.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

SCRIPT = Path(sysconfig.get_path("scripts")) / "iiif_testserver.py"
REQUEST_LINE = re.compile(r'GET (\S+) HTTP/[\d.]+(?:\x1b\[[\d;]*m)?"\s+(\d{3})')  # werkzeug colours 4xx, 5xx lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def image_server(image_dir: Path, log_path: Path, *, versions: str = "3.0,2.1") -> Iterator[str]:
    """Serve `image_dir` through the IIIF Image API on 127.0.0.1; yields the base URL."""
    if not SCRIPT.exists():
        raise RuntimeError(f"{SCRIPT} is missing: install the test extra (pip install -e '.[test]')")
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--app-host", "127.0.0.1", "--app-port", str(port)]
    args += ["--image-dir", str(image_dir), "--pages-dir", str(image_dir), "--api-versions", versions]
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=image_dir, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # up to 30 s for Flask to start on a busy machine
            if server.poll() is not None:
                raise RuntimeError(f"the IIIF server exited ({server.returncode}): {log_path.read_text()[-2000:]}")
            try:
                requests.get(base + "/", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the IIIF server did not start within 30 s")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def requests_logged(log_path: Path) -> list[tuple[str, int]]:
    """(path, status) of every request in the server's log, in order."""
    return [(m[1], int(m[2])) for m in REQUEST_LINE.finditer(log_path.read_text(errors="replace"))]
