"""IIIF input: a Presentation manifest or collection (version 3, or 2) -> one input per canvas, fetched at the
size the model needs.

A museum publishes each object as a manifest: its canvases (views of the object) are painted by images behind
an Image API service that scales on the server. Listing reads the manifest (for a collection, every manifest it
reaches), then each image service's info.json. The image's size there decides the request: `{service}/full/
{w},/0/default.jpg` or `.../,{h}/...`, whichever makes the shorter side the model's decode size, so the decoder's
resize and centre crop see what they would see in the full file, from a fraction of its bytes (the full image,
`max`, when it is smaller than that). What the server says about the image is the input's etag: the info.json's
ETag, else its Last-Modified, else a digest of the info.json itself (a replaced image has new dimensions or
tiles). An input's size is 0: the server makes the image on request, its bytes are unknown until then. An image
whose info.json cannot be had is still an input, sized from what the manifest declares, and its fetch decides
its row (a prediction or the error). Each input carries its object: `object_id` (the manifest's id),
`object_label` (the manifest's label) and `canvas_id`.

The formats are read here rather than with a library: iiif-prezi3 (the IIIF community's v3 models) pins
Pillow <= 12 and validates strictly, so one off-spec field in a museum's manifest would fail a whole night's
listing; piffle's v3 classes log a warning for each embedded resource without its own @context (all of them, in
a valid manifest) and leave annotation bodies as plain dicts, adding nothing over the JSON. An Image API request
is one format string once info.json has given the version and size; piffle's URL builder would first need each
service id split into endpoint and identifier to produce the same string.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import http
from artfuse.data import storage as st

log = logging.getLogger(__name__)

OBJECT_COLUMNS = ("object_id", "object_label", "canvas_id")  # what an input listing may say about its object
LISTING_THREADS = 16  # manifests and info.json requests in flight; each server still gets its own limit
LANGUAGES = ("en", "none")  # which label to keep from a language map, in this order; else the first


@dataclass(frozen=True)
class Canvas:
    canvas_id: str
    object_id: str  # the manifest's id
    object_label: str | None
    image: str  # the painting image's own URL (used as it is where there is no Image API service)
    service: str | None  # Image API service base URI
    version: int  # of the service's Image API: 2 or 3
    width: int  # the image's declared size (the body's, else the canvas's); 0 when unknown
    height: int


@dataclass(frozen=True)
class ServiceInfo:
    width: int
    height: int
    version: int
    etag: str


def is_presentation(uri: str) -> bool:
    """A IIIF manifest or collection: any http(s) URI (a web server cannot be listed), or a .json object."""
    return http.is_http(uri) or uri.lower().rstrip("/").endswith(".json")


def list_canvases(uri: str, storage: StorageConfig | None = None, *, image_size: int | None = None) -> pa.Table:
    """(uri, size, etag, object_id, object_label, canvas_id) of each canvas's image under the manifest or
    collection at `uri`, sorted by uri; `image_size` is the shorter side to ask the server for (None: full)."""
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        canvases = list(_canvases(_read_json(uri, storage), uri, storage, pool, seen={uri}))
        services = sorted({c.service for c in canvases if c.service})
        infos = dict(zip(services, pool.map(lambda s: service_info(s, storage), services), strict=True))
    unavailable = sum(1 for info in infos.values() if info is None)
    if unavailable:
        log.warning("%d of %d image services gave no info.json: their images are sized from the manifest",
                    unavailable, len(services))  # fmt: skip
    rows: dict[str, tuple[str, Canvas]] = {}
    for canvas in canvases:
        request, etag = _request(canvas, infos.get(canvas.service), image_size)
        if request in rows:
            continue  # the same image on several canvases (or a manifest listed twice): labelled once
        rows[request] = (etag, canvas)
    ordered = sorted(rows.items())
    columns = {
        "uri": pa.array([request for request, _ in ordered], pa.string()),
        "size": pa.array([0] * len(ordered), pa.int64()),
        "etag": pa.array([etag for _, (etag, _) in ordered], pa.string()),
    }
    for name in OBJECT_COLUMNS:
        columns[name] = pa.array([getattr(canvas, name) for _, (_, canvas) in ordered], pa.string())
    log.info("%s: %d canvases, %d distinct images", uri, len(canvases), len(ordered))
    return pa.table(columns)


def image_request(service: str, version: int, width: int, height: int, size: int | None) -> str:
    """The Image API request whose answer has `size` as its shorter side (the full image when it is no larger,
    or when its dimensions are unknown)."""
    if not (size and width and height) or min(width, height) <= size:
        spec = "max" if version >= 3 else "full"
    elif width <= height:
        spec = f"{size},"
    else:
        spec = f",{size}"
    return f"{service.rstrip('/')}/full/{spec}/0/default.jpg"


def service_info(service: str, storage: StorageConfig | None = None) -> ServiceInfo | None:
    """Size, version and etag of an Image API service, from its info.json; None when it cannot be had."""
    try:
        answer = http.get(f"{service.rstrip('/')}/info.json", storage)
        info = json.loads(answer.body)
        width, height = int(info["width"]), int(info["height"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("no info.json for %s: %s", service, e)
        return None
    version = 3 if _is_v3_service(info) else 2
    headers = answer.headers
    if headers.get("ETag"):
        etag = headers["ETag"].strip('"')
    elif headers.get("Last-Modified"):
        etag = f"last-modified:{headers['Last-Modified']}"
    else:
        etag = f"info:{hashlib.sha256(answer.body).hexdigest()[:16]}"
    return ServiceInfo(width, height, version, etag)


def text(value) -> str | None:
    """A label as one string: a v3 language map, a v2 string or list of {@value, @language}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "@value" in value:
        return str(value["@value"])
    if isinstance(value, dict):  # v3 language map: {"en": ["..."], "nl": ["..."]}
        language = next((lang for lang in LANGUAGES if lang in value), next(iter(value), None))
        values = value.get(language) if language is not None else None
        return "; ".join(map(str, values)) if isinstance(values, list) else (values and str(values))
    if isinstance(value, list) and value:
        by_language = {v.get("@language"): v for v in value if isinstance(v, dict)}
        preferred = next((by_language[lang] for lang in LANGUAGES if lang in by_language), value[0])
        return text(preferred)
    return None


def _read_json(uri: str, storage: StorageConfig | None) -> dict:
    try:
        raw = st.read_bytes(uri, storage)
    except FileNotFoundError:
        raise ConfigError(f"IIIF manifest or collection not found: {uri}") from None
    except http.HTTPFailure as e:
        raise ConfigError(f"IIIF manifest or collection {uri} could not be read: {e}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{uri} is not JSON ({e}): expected a IIIF manifest or collection") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{uri} is not a IIIF manifest or collection (a JSON {type(doc).__name__})")
    return doc


def manifests(uri: str, storage: StorageConfig | None = None) -> Iterator[dict]:
    """Every manifest under the manifest or collection at `uri`, parsed, each once: a collection's members are
    read a few at a time (a broken member is logged and skipped), so a collection of any size is walked in
    bounded memory."""
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        yield from _manifests(_read_json(uri, storage), uri, storage, pool, seen={uri})


def _canvases(doc: dict, source: str, storage, pool: ThreadPoolExecutor, seen: set[str]) -> Iterator[Canvas]:
    for manifest in _manifests(doc, source, storage, pool, seen):
        yield from _manifest_canvases(manifest)


def _manifests(doc: dict, source: str, storage, pool: ThreadPoolExecutor, seen: set[str]) -> Iterator[dict]:
    kind = _type(doc)
    if kind == "Manifest":
        yield doc
        return
    if kind != "Collection":
        raise ConfigError(
            f"{source} is not a IIIF manifest or collection (its type is {kind or 'missing'}): "
            "give --input a Presentation API (version 2 or 3) Manifest or Collection"
        )
    embedded, referenced = [], []
    for member in _members(doc):
        if not isinstance(member, dict) or _id(member) in seen:
            continue  # a member reached twice (collections may overlap) is listed once
        seen.add(_id(member))
        if any(key in member for key in ("items", "sequences", "manifests", "collections")):
            embedded.append(member)
        elif _id(member):
            referenced.append(_id(member))
    for member in embedded:
        yield from _manifests(member, _id(member) or source, storage, pool, seen)
    step = 4 * LISTING_THREADS  # members read ahead of the one walked: enough to keep the threads busy
    for start in range(0, len(referenced), step):
        refs = referenced[start : start + step]
        for ref, loaded in zip(refs, pool.map(lambda r: _read_member(r, storage), refs), strict=True):
            if loaded is not None:
                yield from _manifests(loaded, ref, storage, pool, seen)


def _read_member(uri: str, storage: StorageConfig | None) -> dict | None:
    """A collection's member; a broken one is logged and skipped, so one bad object does not stop a night."""
    try:
        return _read_json(uri, storage)
    except ConfigError as e:
        log.warning("skipping a collection member: %s", e)
        return None


def _manifest_canvases(manifest: dict) -> Iterator[Canvas]:
    object_id, label = _id(manifest) or "", text(manifest.get("label"))
    if "sequences" in manifest:  # Presentation 2: sequences[0].canvases[].images[].resource
        sequences = manifest.get("sequences") or [{}]
        for canvas in sequences[0].get("canvases", []):
            images = [i for i in canvas.get("images", []) if isinstance(i, dict)]
            resource = images[0].get("resource") if images else None
            if isinstance(resource, dict) and "default" in resource:  # oa:Choice
                resource = resource["default"]
            if isinstance(resource, dict):
                yield _canvas(canvas, resource, object_id, label)
        return
    for canvas in manifest.get("items", []):  # Presentation 3: items[].items[].items[] painting annotations
        body = _painting_body(canvas)
        if body is not None:
            yield _canvas(canvas, body, object_id, label)


def _painting_body(canvas: dict) -> dict | None:
    for page in canvas.get("items", []):
        for annotation in page.get("items", []):
            motivation = annotation.get("motivation")
            if motivation != "painting" and not (isinstance(motivation, list) and "painting" in motivation):
                continue
            body = annotation.get("body")
            body = body[0] if isinstance(body, list) and body else body
            if isinstance(body, dict) and body.get("type") == "Choice":
                body = (body.get("items") or [None])[0]
            if isinstance(body, dict):
                return body
    return None


def _canvas(canvas: dict, image: dict, object_id: str, label: str | None) -> Canvas:
    services = image.get("service") or []
    services = services if isinstance(services, list) else [services]
    service = next((s for s in services if isinstance(s, dict) and _is_image_service(s)), None)
    width = int(image.get("width") or canvas.get("width") or 0)
    height = int(image.get("height") or canvas.get("height") or 0)
    return Canvas(
        canvas_id=_id(canvas) or "",
        object_id=object_id,
        object_label=label,
        image=_id(image) or "",
        service=_id(service) if service else None,
        version=3 if service and _is_v3_service(service) else 2,
        width=width,
        height=height,
    )


def _request(canvas: Canvas, info: ServiceInfo | None, size: int | None) -> tuple[str, str]:
    """The canvas image's URI to fetch and its etag."""
    if not canvas.service:
        return canvas.image, ""  # a plain image URL: fetched whole, no server-side scaling
    if info is None:
        return image_request(canvas.service, canvas.version, canvas.width, canvas.height, size), ""
    return image_request(canvas.service, info.version, info.width, info.height, size), info.etag


def _members(collection: dict) -> list:
    if "items" in collection:
        return list(collection["items"])
    return [*collection.get("collections", []), *collection.get("manifests", []), *collection.get("members", [])]


def _type(doc: dict) -> str:
    kind = doc.get("type") or doc.get("@type") or ""
    return kind.split(":")[-1] if isinstance(kind, str) else ""  # "sc:Manifest" (v2) -> "Manifest"


def _id(resource: dict) -> str | None:
    return resource.get("id") or resource.get("@id")


def _is_image_service(service: dict) -> bool:
    kind = str(service.get("type") or service.get("@type") or "")
    marks = f"{kind} {service.get('@context', '')} {service.get('profile', '')}"
    return kind.startswith("ImageService") or "iiif.io/api/image" in marks


def _is_v3_service(service: dict) -> bool:
    context = service.get("@context") or ""
    context = " ".join(context) if isinstance(context, list) else str(context)
    return service.get("type") == "ImageService3" or "iiif.io/api/image/3" in context
