"""Predictions as IIIF Presentation 3 annotations (W3C Web Annotations): the documents `artfuse annotate` writes,
built here by small pure functions, and their check against the IIIF project's own JSON Schema.

One Annotation says what one canvas (or image) is for one task:
- `motivation` `tagging`: Mirador shows annotations whose motivation is in its `filteredMotivations` (commenting,
  tagging, painting by default), so a `classifying` annotation would stay hidden there; Europeana's Annotations API
  takes software-generated tags with this motivation too.
- `body`: the label as a TextualBody (`purpose` tagging) and, where the user's vocabulary maps the label, a
  SpecificResource whose `source` is the Getty AAT or Wikidata URI (`purpose` classifying, IIIF cookbook recipe
  0258). With that second body the motivation is `["tagging", "classifying"]`: Mirador 4 renders an annotation
  whose only motivation is `tagging` by reading a `value` from every body, which a SpecificResource lacks, and its
  annotation panel then fails.
- `target`: the canvas id, or the image's URL for rows that are not from IIIF.
- `creator`: the model package and the run (a `Software` agent), or the curator who decided (a `Person`);
  `generator`: artfuse. So a machine's label is told from a person's.
- the calibrated score, `needs_review` and what the model said go in `artfuse:` extension properties, defined by
  the project's JSON-LD context (schemas/annotation-context.jsonld), which is published beside the annotations.

Ids are derived, never random: a page's from its manifest's id (or run), an annotation's from its target and task,
so a rerun writes the same documents byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from urllib.parse import quote

IIIF_CONTEXT = "http://iiif.io/api/presentation/3/context.json"
CONTEXT_NAME = "context.json"  # the project's JSON-LD context, as published beside the pages
MACHINE = {"type": "Software", "name": "artfuse annotate"}  # the generator of every annotation
SELECTIONS = ("all", "accepted", "decided")  # which predictions become annotations (annotate --rows)
DEFAULT_SELECTION = ("accepted", "decided")
SCORE_DIGITS = 4  # the calibrated score as written: enough to rank, and the same bytes on every rerun


@dataclass(frozen=True)
class Label:
    """One annotation's facts: a prediction row's label for one task, or a curator's decision on it."""

    target: str  # the canvas id, or the image's URL
    task: str
    label: str  # what the annotation says: the curator's decision where there is one, else the model's
    machine_label: str  # what the model said
    score: float  # the model's calibrated score for machine_label
    needs_review: bool
    model_id: str
    run_id: str
    created: datetime  # labelled_at, or decided_at for a decision
    reviewer: str | None = None  # set when a curator decided
    vocabulary_uri: str | None = None


def digest(*parts: str, n: int = 20) -> str:
    """A short stable name for `parts` (hex of their sha256)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:n]


def page_path(object_id: str) -> str:
    """Where a manifest's AnnotationPage lives under the output (and its copy beside it): iiif/<digest of its id>/."""
    return f"iiif/{digest(object_id)}/annotations.json"


def manifest_path(object_id: str) -> str:
    return f"iiif/{digest(object_id)}/manifest.json"


def run_page_path(run_id: str) -> str:
    return f"runs/{quote(run_id, safe='')}.json"


def annotation_id(page_id: str, target: str, task: str) -> str:
    """Stable: the page, then a fragment from the target and the task (a rerun gives the same id)."""
    return f"{page_id}#{digest(target, task, n=16)}"


def annotation(label: Label, page_id: str, language: str) -> dict:
    """The Web Annotation for `label`, an item of the page `page_id`."""
    body: list[dict] = [
        {
            "type": "TextualBody",
            "value": label.label,
            "language": language,
            "format": "text/plain",
            "purpose": "tagging",
        }
    ]
    motivation: str | list[str] = "tagging"
    if label.vocabulary_uri:
        body.append({"type": "SpecificResource", "source": label.vocabulary_uri, "purpose": "classifying"})
        motivation = ["tagging", "classifying"]
    if label.reviewer is not None:
        creator = {"type": "Person", "name": label.reviewer}
    else:
        creator = {"type": "Software", "name": f"artfuse model {label.model_id}, run {label.run_id}"}
    return {
        "id": annotation_id(page_id, label.target, label.task),
        "type": "Annotation",
        "motivation": motivation,
        "body": body,
        "target": label.target,
        "creator": creator,
        "generator": MACHINE,
        "created": f"{label.created:%Y-%m-%dT%H:%M:%SZ}",
        "artfuse:task": label.task,
        "artfuse:machineLabel": label.machine_label,
        "artfuse:score": round(float(label.score), SCORE_DIGITS),
        "artfuse:needsReview": bool(label.needs_review),
        "artfuse:model": label.model_id,
        "artfuse:run": label.run_id,
    }


def contexts(context_url: str) -> list[str]:
    """A document's @context: the project's context first, the IIIF context last (as Presentation 3 asks)."""
    return [context_url, IIIF_CONTEXT]


def page(page_id: str, items: list[dict], context_url: str | None) -> dict:
    """An AnnotationPage; `context_url` None for one embedded in a manifest (the manifest's @context holds)."""
    doc = {"@context": contexts(context_url)} if context_url else {}
    return doc | {"id": page_id, "type": "AnnotationPage", "items": items}


def canvas_page_id(page_id: str, canvas_id: str) -> str:
    """The id of the part of a manifest's page embedded in one canvas."""
    return f"{page_id}#canvas-{digest(canvas_id, n=16)}"


def embed(manifest: dict, copy_id: str, page_doc: dict, context_url: str) -> dict:
    """A copy of a Presentation 3 `manifest` (published at `copy_id`) whose canvases each carry, in `annotations`,
    the items of `page_doc` that target them, as a page of their own: Mirador 4 reads annotations from there, and
    files every annotation of a canvas's page under that canvas whatever its target."""
    by_canvas: dict[str, list[dict]] = {}
    for item in page_doc["items"]:
        by_canvas.setdefault(item["target"], []).append(item)
    copy = dict(manifest)
    context = manifest.get("@context") or IIIF_CONTEXT
    context = context if isinstance(context, list) else [context]
    copy["@context"] = [context_url, *(c for c in context if c != context_url)]
    copy["id"] = copy_id
    canvases = []
    for canvas in manifest.get("items", []):
        items = by_canvas.get(canvas.get("id"), []) if isinstance(canvas, dict) else []
        if items:
            ours = canvas_page_id(page_doc["id"], canvas["id"])
            kept = [p for p in canvas.get("annotations", []) if not (isinstance(p, dict) and p.get("id") == ours)]
            canvas = dict(canvas, annotations=[*kept, page(ours, items, None)])
        canvases.append(canvas)
    copy["items"] = canvases
    return copy


def is_presentation3(manifest: dict) -> bool:
    context = manifest.get("@context") or ""
    return manifest.get("type") == "Manifest" and "iiif.io/api/presentation/3" in json.dumps(context)


def dumps(doc: dict) -> bytes:
    """The bytes written: compact, key order as built, so a rerun writes the same bytes."""
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def context_document() -> bytes:
    """The project's JSON-LD context, as shipped with the package."""
    return resources.files("artfuse.data").joinpath("schemas/annotation-context.jsonld").read_bytes()


@cache
def _validators():
    from jsonschema import Draft7Validator

    schema = json.loads(resources.files("artfuse.data").joinpath("schemas/iiif_3_0.json").read_text())
    annotation_only = dict(schema, oneOf=[{"$ref": "#/classes/annotation"}])
    return Draft7Validator(schema), Draft7Validator(annotation_only)


def schema_errors(doc: dict, *, annotation_only: bool = False) -> list[str]:
    """What keeps `doc` (a Manifest, Collection, AnnotationPage or Annotation) from validating against the IIIF
    Presentation 3 JSON Schema; empty when it validates."""
    from jsonschema.exceptions import best_match

    validator = _validators()[1 if annotation_only else 0]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    # The schema's top level is a oneOf over document kinds: best_match descends to the error that says what is wrong.
    return [_message(best_match([e])) + _hint(e) for e in errors]


def _message(error) -> str:
    return f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"


def _hint(error) -> str:
    stack = [error]
    while stack:
        e = stack.pop()
        if e.validator == "pattern" and str(e.validator_value).startswith("^http"):
            return f" (IIIF ids and targets must be http(s) URLs; {e.instance!r} at {_message(e).split(':')[0]} is not)"
        stack += e.context
    return ""
