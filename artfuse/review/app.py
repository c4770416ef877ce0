"""`artfuse review`: the review queue as a small Flask app, one decision per click or key.

Bound to 127.0.0.1 by default. Bound to any other address it refuses every request without the access token
(printed in the URL at start, or given with --token / ARTFUSE_REVIEW_TOKEN), taken once from `?token=` into a
cookie. Bound to loopback it answers only requests addressed to a loopback name, so a web page elsewhere cannot
reach it by rebinding a DNS name to 127.0.0.1; decisions are JSON POSTs, which a page from another origin cannot
send without a CORS preflight that this app never grants.
"""

from __future__ import annotations

import functools
import getpass
import ipaddress
import logging
import os
import secrets
import threading

from flask import Flask, Response, abort, jsonify, render_template, request
from werkzeug.serving import BaseWSGIServer, make_server

from artfuse.config import Config, ConfigError
from artfuse.data import storage
from artfuse.data.images import preview_jpeg
from artfuse.models.package import read_manifest
from artfuse.review.neighbours import NearestNeighbours
from artfuse.review.predictions import load_latest
from artfuse.review.queue import ReviewQueue

log = logging.getLogger(__name__)
TOKEN_ENV = "ARTFUSE_REVIEW_TOKEN"
COOKIE = "artfuse_review_token"
IMAGE_SIDE = 768  # the image under review: readable on a laptop screen, small enough to load at once
THUMB_SIDE = 192  # similar works
SIMILAR = 5  # similar works shown beside the image under review
PREVIEWS_CACHED = 256  # encoded previews kept in memory (about 100 KB each at IMAGE_SIDE)


def create_app(
    queue: ReviewQueue,
    cfg: Config,
    *,
    token: str | None = None,
    neighbours: NearestNeighbours | None = None,
    reviewer: str = "",
) -> Flask:
    app = Flask(__name__)
    app.config.update(ALLOWED_HOSTS=None, JSON_SORT_KEYS=False)

    @functools.lru_cache(maxsize=PREVIEWS_CACHED)
    def preview(uri: str, side: int) -> bytes | None:
        return preview_jpeg(storage.read_bytes(uri, cfg.storage), side, max_pixels=cfg.data.max_pixels)

    @app.before_request
    def guard() -> Response | None:
        allowed = app.config["ALLOWED_HOSTS"]
        if allowed is not None and request.host not in allowed:
            abort(403, "this review server answers only requests to its loopback address")
        if token is None:
            return None
        given = request.cookies.get(COOKIE) or request.headers.get("X-Artfuse-Token") or request.args.get("token")
        if not given or not secrets.compare_digest(given, token):
            abort(403, "an access token is required: open the URL printed by `artfuse review`")
        return None

    @app.after_request
    def remember_token(response: Response) -> Response:
        if token is not None and request.args.get("token") == token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    @app.errorhandler(ConfigError)
    def bad_request(error: ConfigError):
        return jsonify(error=str(error)), 400

    @app.get("/")
    def page():
        return render_template(
            "review.html", tasks=queue.tasks, reviewer=reviewer, similar=neighbours is not None, k=SIMILAR
        )

    @app.get("/api/facets")
    def facets():
        return jsonify(queue.facets(request.args.get("task") or queue.tasks[0]))

    @app.get("/api/queue")
    def queue_page():
        args = request.args
        return jsonify(
            queue.page(
                args.get("task") or queue.tasks[0],
                label=args.get("label") or None,
                run=args.get("run") or None,
                after=args.get("after", -1, type=int),
                limit=min(args.get("limit", 20, type=int), 100),
            )
        )

    @app.post("/api/decide")
    def decide():
        if not request.is_json:
            abort(415, "decisions are JSON")
        body = request.get_json(silent=True) or {}
        missing = [key for key in ("uri", "task", "label") if not isinstance(body.get(key), str)]
        if missing:
            raise ConfigError(f"a decision needs {', '.join(missing)}")
        decision = queue.decide(body["uri"], body["task"], body["label"], str(body.get("reviewer") or ""))
        return jsonify(uri=decision["uri"], task=decision["task"], label=decision["label"])

    @app.get("/api/similar")
    def similar():
        uri = request.args.get("uri", "")
        if neighbours is None or uri not in queue.row_of_uri:
            return jsonify(neighbours=[])
        task = request.args.get("task") or queue.tasks[0]
        rows, similarity = neighbours.query(queue.row_of_uri[uri], SIMILAR)
        return jsonify(
            neighbours=[
                {"uri": queue.uris[r], "label": queue.table[task][r].as_py(), "similarity": round(float(s), 3)}
                for r, s in zip(rows.tolist(), similarity.tolist(), strict=True)
            ]
        )

    @app.get("/image")
    def image():
        uri = request.args.get("uri", "")
        if uri not in queue.row_of_uri:  # only what is under review: never an arbitrary path or key
            abort(404)
        side = THUMB_SIDE if request.args.get("size") == "thumb" else IMAGE_SIDE
        data = preview(uri, side)
        if data is None:
            abort(422, "this image cannot be decoded")
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app


def open_review(
    predictions_uri: str, corrections_uri: str, cfg: Config, *, model_uri: str | None = None
) -> tuple[ReviewQueue, NearestNeighbours | None]:
    """The queue over a predictions dataset (and its similar-works index where the rows carry embeddings)."""
    vocabs = read_manifest(model_uri, cfg.storage)["tasks"] if model_uri else None
    table = load_latest(predictions_uri, cfg.storage, embeddings="if_any")
    neighbours = NearestNeighbours.from_column(table["embedding"]) if "embedding" in table.column_names else None
    return ReviewQueue(table, corrections_uri, cfg.storage, vocabs), neighbours


def review_server(
    predictions_uri: str,
    corrections_uri: str,
    cfg: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    reviewer: str | None = None,
    model_uri: str | None = None,
) -> tuple[BaseWSGIServer, str]:
    """A threaded HTTP server for the review app, bound but not yet serving; returns it and the URL to open."""
    loopback = _is_loopback(host)
    token = token or os.environ.get(TOKEN_ENV) or (None if loopback else secrets.token_urlsafe(24))
    queue, neighbours = open_review(predictions_uri, corrections_uri, cfg, model_uri=model_uri)
    reviewer = reviewer if reviewer is not None else _user()
    app = create_app(queue, cfg, token=token, neighbours=neighbours, reviewer=reviewer)
    server = make_server(host, port, app, threaded=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request (every image) says nothing useful
    shown = f"[{host}]" if ":" in host else host
    if loopback:
        app.config["ALLOWED_HOSTS"] = {f"{name}:{server.port}" for name in ("127.0.0.1", "localhost", "[::1]", shown)}
    url = f"http://{shown}:{server.port}/" + (f"?token={token}" if token else "")
    return server, url


def review(predictions_uri: str, corrections_uri: str, cfg: Config, **kwargs) -> None:
    """Serve the review queue until interrupted."""
    server, url = review_server(predictions_uri, corrections_uri, cfg, **kwargs)
    print(f"artfuse review: open {url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def serve_in_thread(server: BaseWSGIServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return ""
