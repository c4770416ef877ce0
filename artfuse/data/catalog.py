"""A collection -> an Arrow table of (uri, size, etag, a label column per task, split), plus vocabularies.

A collection is a folder with one sub-folder per label (one task, `label`) or a CSV/Parquet manifest with a
`path` column and one column per task; manifest paths are relative to the manifest's folder or absolute
URIs. Sizes and etags come from one listing of the root, never a request per object. The split is
stratified on the first task and decided per image by a seeded hash of its path below the root, so it is
deterministic and the same for a local copy and an S3 copy of a collection. Three splits: `train` (learns), `val`
(chooses the best epoch and any setting) and `test` (chose nothing, reports the figure); `data.test_fraction=0`
gives the older train / val split, whose figures are validation figures. `data.folds` deals the images outside the
test split into stratified folds for cross-validation (one fold is val, the rest train, the test split is left out).

A manifest row may name a IIIF manifest instead of a path (`iiif_manifest` column): each of its canvases'
images becomes a row with that row's labels, fetched at the size the model decodes (artfuse.data.iiif). The
object's images share its split key, so the views of one object stay together in one split.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from artfuse.config import ConfigError, DataConfig, StorageConfig
from artfuse.data import iiif, inventory
from artfuse.data import storage as st
from artfuse.data.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

FOLDER_TASK = "label"
SPLITS = ("train", "val", "test")
# Under data.folds, the test split's rows: in the table (the fingerprint is the collection's, whatever the split) but
# in no split a run reads.
LEFT_OUT = "left_out"
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
_EMPTY_INPUTS = pa.table(
    {"uri": pa.array([], pa.string()), "size": pa.array([], pa.int64()), "etag": pa.array([], pa.string())}
)
IIIF_COLUMN = "iiif_manifest"  # a manifest column naming a IIIF manifest per row, instead of a path
# manifest columns that describe the object, not a label of it
RESERVED_COLUMNS = frozenset(
    f"path uri split size etag mtime format width height sha256 md5 error id {IIIF_COLUMN}".split()
)
# what a labelling job skips in an input folder: everything else gets a row, decodable or not
NON_IMAGE_SUFFIXES = (
    ".csv", ".tsv", ".parquet", ".pq", ".json", ".jsonl", ".txt", ".md", ".rst", ".yaml", ".yml",
    ".toml", ".xml", ".html", ".htm", ".py", ".sh", ".log", ".pdf", ".zip", ".gz", ".tar",
)  # fmt: skip


@dataclass
class Collection:
    root: str  # canonical URI of the folder the collection lives in (a manifest's folder)
    table: pa.Table  # uri, size, etag, one string column per task, split (train / val / test); sorted by uri
    tasks: list[str]
    vocabs: dict[str, list[str]]  # sorted labels per task
    extra: str = ""  # a digest of what else shaped the table (a corrections dataset), part of the fingerprint

    @property
    def fingerprint(self) -> str:
        """Short sha256 over the sorted (uri, etag, labels) rows: changes when an image or a label does."""
        digest = hashlib.sha256("\x1f".join(self.tasks).encode() + self.extra.encode())
        columns = [self.table.column(name).to_pylist() for name in ("uri", "etag", *self.tasks)]
        for row in sorted(zip(*columns, strict=True)):
            digest.update(("\x1e" + "\x1f".join(row)).encode())
        return digest.hexdigest()[:16]

    @property
    def content_fingerprint(self) -> str:
        """`fingerprint` over paths relative to `root` and sizes instead of URIs and etags (a local etag is the
        mtime): the same images and labels copied to another folder or machine keep it, as a git clone does."""
        digest = hashlib.sha256("\x1f".join(self.tasks).encode() + self.extra.encode())
        prefix = self.root.rstrip("/") + "/"
        paths = [uri.removeprefix(prefix) for uri in self.table.column("uri").to_pylist()]
        sizes = [str(size) for size in self.table.column("size").to_pylist()]
        labels = [self.table.column(task).to_pylist() for task in self.tasks]
        for row in sorted(zip(paths, sizes, *labels, strict=True)):
            digest.update(("\x1e" + "\x1f".join(row)).encode())
        return digest.hexdigest()[:16]

    def subset(self, split: str) -> pa.Table:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.table.filter(pc.equal(self.table.column("split"), split))


def load_collection(
    uri: str, data: DataConfig, storage: StorageConfig | None = None, *, image_size: int | None = None
) -> Collection:
    """Load a folder-per-label tree or a CSV/Parquet manifest as a split, labelled collection; IIIF images are
    requested with `image_size` as their shorter side (None: full size)."""
    split_keys: dict[str, str] = {}
    if _is_manifest(uri):
        root = posixpath.dirname(st.canonical_uri(uri))
        manifest, canvases = _with_iiif_canvases(_read_manifest(uri, storage), root, uri, storage, image_size)
        tasks = _select_tasks(manifest.column_names, data.tasks, uri)
        uris = _manifest_uris(manifest, root, uri)
        sizes, etags = _sizes_and_etags(uris, root, uri, storage, known=canvases)
        split_keys = {image: obj for image, (_, _, obj) in canvases.items()}
        labels = {task: _labels(manifest, task, uris, uri) for task in tasks}
        given_split = _given_split(manifest, uris, uri) if "split" in manifest.column_names else None
    else:
        root = st.canonical_uri(uri)
        if data.tasks and list(data.tasks) != [FOLDER_TASK]:
            raise ConfigError(
                f"{uri} is a folder-per-label collection, whose one task is '{FOLDER_TASK}'; "
                f"data.tasks={data.tasks} asks for others (set data.tasks=[] or use a manifest)"
            )
        tasks = [FOLDER_TASK]
        uris, sizes, etags, folder_labels = _folder_rows(uri, root, storage)
        labels = {FOLDER_TASK: folder_labels}
        given_split = None
    if not uris:
        raise ConfigError(
            f"the collection {uri} is empty: expected one sub-folder per label holding "
            f"{'/'.join(IMAGE_SUFFIXES)} files, or a manifest with rows"
        )
    duplicate, count = Counter(uris).most_common(1)[0] if uris else ("", 0)
    if count > 1:
        raise ConfigError(f"{uri} lists {duplicate} more than once: each image may appear once")
    keys = [split_keys.get(u) or _key_below(root, u) for u in uris]
    split = given_split or _stratified_split(keys, labels[tasks[0]], tasks[0], data)
    if data.folds:
        split = _fold_split(keys, labels[tasks[0]], split, tasks[0], data)
    table = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "etag": pa.array(etags, pa.string()),
            **{task: pa.array(labels[task], pa.string()) for task in tasks},
            "split": pa.array(split, pa.string()),
        }
    ).sort_by("uri")
    vocabs = {task: sorted(set(labels[task])) for task in tasks}
    return Collection(root=root, table=table, tasks=tasks, vocabs=vocabs)


def list_inputs(uri: str, storage: StorageConfig | None = None, *, image_size: int | None = None) -> pa.Table:
    """(uri, size, etag) of every input to label: a manifest's paths, or every file under a folder except
    hidden ones and obvious non-images (.csv, .json, .txt, ...); a `.jpg` that is really garbage is kept,
    so the labelling job can give it an error row. A IIIF manifest or collection lists each canvas's image,
    requested with `image_size` as its shorter side, plus its object (`iiif.OBJECT_COLUMNS`). An S3 Inventory's
    manifest.json lists its objects (no listing).

    A manifest's path listed twice is one input (the table's metadata `duplicates` counts the extra rows); a
    path whose object does not exist is kept with size 0 and an empty etag, so it gets its error row."""
    if inventory.is_inventory(uri, storage) or not (_is_manifest(uri) or iiif.is_presentation(uri)):
        listed = list(iter_inputs(uri, storage, image_size=image_size))
        return pa.concat_tables([_EMPTY_INPUTS, *listed]).sort_by("uri")
    if _is_manifest(uri):
        root = posixpath.dirname(st.canonical_uri(uri))
        manifest, canvases = _with_iiif_canvases(_read_manifest(uri, storage), root, uri, storage, image_size)
        listed = _manifest_uris(manifest, root, uri)
        uris = sorted(set(listed))
        known = _listing_of(uris, root, storage, canvases)
        missing = [u for u in uris if u not in known]
        if missing:
            logger.warning("%d path(s) in %s not found, e.g. %s: each gets an error row", len(missing), uri, missing[0])
        duplicates = len(listed) - len(uris)
        if duplicates:
            logger.warning("%s lists %d path(s) more than once: each object is labelled once", uri, duplicates)
        table = pa.table(
            {
                "uri": pa.array(uris, pa.string()),
                "size": pa.array([known.get(u, (0, ""))[0] for u in uris], pa.int64()),
                "etag": pa.array([known.get(u, (0, ""))[1] for u in uris], pa.string()),
            }
        )
        return table.replace_schema_metadata({"duplicates": str(duplicates)})
    return iiif.list_canvases(uri, storage, image_size=image_size)


def iter_inputs(uri: str, storage: StorageConfig | None = None, *, image_size: int | None = None) -> Iterator[pa.Table]:
    """`list_inputs` in parts, unsorted: a folder's or S3 prefix's objects batch by batch as they are listed, an
    S3 Inventory's a data file at a time, so that an archive of millions of objects never sits whole in memory. A
    manifest or IIIF input comes as one table (it is one file, read whole anyway)."""
    if inventory.is_inventory(uri, storage):
        for part in inventory.iter_inventory(uri, storage):
            yield _inputs_only(part, root="s3://")
    elif _is_manifest(uri) or iiif.is_presentation(uri):
        yield list_inputs(uri, storage, image_size=image_size)
    else:
        root = st.canonical_uri(uri)
        for batch in st.iter_objects(uri, storage):
            yield _inputs_only(batch, root)


def _inputs_only(listing: pa.Table, root: str) -> pa.Table:
    """The listing without hidden objects (a part of the key below `root` starts with ".") and obvious non-images.
    In Arrow, not per Python string: an archive's listing is millions of rows."""
    uris = listing.column("uri")
    prefix = root.rstrip("/") + "/"
    below = pc.starts_with(uris, prefix)
    hidden = pc.or_(
        pc.match_substring_regex(uris, "^" + re.escape(prefix) + r"(.*/)?\."),
        pc.and_not(pc.match_substring_regex(uris, r"(^|/)\."), below),  # a file listing itself: its whole path
    )
    suffixes = "|".join(re.escape(s.lstrip(".")) for s in NON_IMAGE_SUFFIXES)
    not_image = pc.match_substring_regex(uris, rf"\.({suffixes})$", ignore_case=True)
    return listing.filter(pc.invert(pc.or_(hidden, not_image)))


def _is_manifest(uri: str) -> bool:
    return uri.lower().rstrip("/").endswith(MANIFEST_SUFFIXES)


def _folder_rows(
    uri: str, root: str, storage: StorageConfig | None
) -> tuple[list[str], list[int], list[str], list[str]]:
    listing = st.list_objects(uri, storage, suffixes=IMAGE_SUFFIXES)
    uris, sizes, etags, labels = [], [], [], []
    stray = 0
    for u, size, etag in zip(*(listing.column(c).to_pylist() for c in ("uri", "size", "etag")), strict=True):
        key = _key_below(root, u)
        if _is_hidden(key):
            continue
        if "/" not in key:
            stray += 1
            continue
        uris.append(u)
        sizes.append(size)
        etags.append(etag)
        labels.append(key.split("/", 1)[0])
    if stray:
        logger.warning("%s: skipped %d image(s) directly in the root, outside any label folder", uri, stray)
    return uris, sizes, etags, labels


def _read_manifest(uri: str, storage: StorageConfig | None) -> pa.Table:
    """The manifest with every column as strings (labels such as "01" or "1905" must stay as written)."""
    try:
        raw = st.read_bytes(uri, storage)
    except FileNotFoundError:
        raise ConfigError(f"manifest not found: {uri}") from None
    try:
        if uri.lower().endswith(".csv"):
            names = pacsv.open_csv(pa.BufferReader(raw)).schema.names
            as_strings = pacsv.ConvertOptions(column_types={name: pa.string() for name in names})
            table = pacsv.read_csv(pa.BufferReader(raw), convert_options=as_strings)
        else:
            table = pq.read_table(pa.BufferReader(raw))
            table = pa.table({name: pc.cast(table.column(name), pa.string()) for name in table.column_names})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ConfigError(f"manifest {uri} cannot be read: {e}") from None
    if "path" not in table.column_names and IIIF_COLUMN not in table.column_names:
        raise ConfigError(
            f"manifest {uri} has no 'path' column (columns: {', '.join(table.column_names)}): "
            f"add one with each image's path relative to the manifest or its URI (or an '{IIIF_COLUMN}' column)"
        )
    return table


def _with_iiif_canvases(
    manifest: pa.Table, root: str, manifest_uri: str, storage: StorageConfig | None, image_size: int | None
) -> tuple[pa.Table, dict[str, tuple[int, str, str]]]:
    """Rows naming a IIIF manifest become one row per canvas image (its Image API request as `path`); returns
    them with {image uri: (size, etag, the object's manifest URI)}."""
    if IIIF_COLUMN not in manifest.column_names:
        return manifest, {}
    n = manifest.num_rows
    paths = manifest.column("path").to_pylist() if "path" in manifest.column_names else [None] * n
    taken, new_paths, canvases = [], [], {}
    for row, (path, obj) in enumerate(zip(paths, manifest.column(IIIF_COLUMN).to_pylist(), strict=True)):
        if bool(path) == bool(obj):
            raise ConfigError(
                f"row {row + 1} of {manifest_uri} needs exactly one of 'path' and '{IIIF_COLUMN}' (has "
                f"{'both' if path else 'neither'})"
            )
        if path:
            taken.append(row)
            new_paths.append(path)
            continue
        obj = obj if "://" in obj or obj.startswith("/") else st.join(root, obj)
        listed = iiif.list_canvases(obj, storage, image_size=image_size)
        for image, etag in zip(listed.column("uri").to_pylist(), listed.column("etag").to_pylist(), strict=True):
            taken.append(row)
            new_paths.append(image)
            canvases[image] = (0, etag, obj)
    expanded = manifest.take(pa.array(taken, pa.int64()))
    if "path" in expanded.column_names:
        expanded = expanded.drop_columns(["path"])
    return expanded.append_column("path", pa.array(new_paths, pa.string())), canvases


def _select_tasks(columns: list[str], wanted: list[str], manifest_uri: str) -> list[str]:
    label_columns = [c for c in columns if c.strip() and not _is_reserved(c)]
    for task in wanted:
        if task not in label_columns:
            raise ConfigError(
                f"unknown label column '{task}' in {manifest_uri} "
                f"(label columns: {', '.join(label_columns) or 'none'}): fix data.tasks"
            )
    if wanted:
        return list(wanted)
    if not label_columns:
        raise ConfigError(
            f"manifest {manifest_uri} has no label columns (columns: {', '.join(columns)}): "
            "add one column per task beside 'path'"
        )
    return label_columns


def _manifest_uris(manifest: pa.Table, root: str, manifest_uri: str) -> list[str]:
    uris = []
    for row, path in enumerate(manifest.column("path").to_pylist(), start=1):
        if not path:
            raise ConfigError(f"row {row} of {manifest_uri} has an empty path")
        if "://" in path or path.startswith("/"):
            uris.append(st.canonical_uri(path))
            continue
        relative = posixpath.normpath(path)
        if relative == ".." or relative.startswith("../"):
            raise ConfigError(
                f"path {path!r} on row {row} of {manifest_uri} escapes the manifest's folder {root}: "
                "use a path below it or an absolute URI"
            )
        uris.append(st.join(root, relative))
    return uris


def _sizes_and_etags(
    uris: list[str], root: str, manifest_uri: str, storage: StorageConfig | None, known: dict | None = None
) -> tuple[list[int], list[str]]:
    """Size and etag of each manifest object; every one must exist. `known` holds those that need no listing
    (IIIF images), {uri: (size, etag, ...)}."""
    known = _listing_of(uris, root, storage, known)
    missing = [u for u in uris if u not in known]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(f"{len(missing)} path(s) in manifest {manifest_uri} not found: {shown}")
    return [known[u][0] for u in uris], [known[u][1] for u in uris]


def _listing_of(
    uris: list[str], root: str, storage: StorageConfig | None, known: dict | None = None
) -> dict[str, tuple[int, str]]:
    """uri -> (size, etag) from one listing of the root (plus one per folder outside it); absent objects left out.
    Where `known` already holds every uri, nothing is listed."""
    known = {u: (size, etag) for u, (size, etag, *_) in (known or {}).items()}
    if any(u not in known for u in uris):
        known.update(_listing_by_uri(root, storage))
    outside_folders = {posixpath.dirname(u) for u in uris if u not in known and not u.startswith(root + "/")}
    for folder in sorted(outside_folders):
        try:
            known.update(_listing_by_uri(folder, storage))
        except ConfigError:
            pass  # the caller decides about objects not found
    return known


def _listing_by_uri(uri: str, storage: StorageConfig | None) -> dict[str, tuple[int, str]]:
    listing = st.list_objects(uri, storage)
    columns = (listing.column(c).to_pylist() for c in ("uri", "size", "etag"))
    return {u: (size, etag) for u, size, etag in zip(*columns, strict=True)}


def _labels(manifest: pa.Table, task: str, uris: list[str], manifest_uri: str) -> list[str]:
    labels = manifest.column(task).to_pylist()
    unlabelled = [u for u, label in zip(uris, labels, strict=True) if not label]
    if unlabelled:
        raise ConfigError(
            f"{len(unlabelled)} row(s) of {manifest_uri} have no '{task}' label, e.g. {unlabelled[0]}: "
            "fill them in or drop those rows"
        )
    return labels


def _given_split(manifest: pa.Table, uris: list[str], manifest_uri: str) -> list[str]:
    split = [(s or "").strip().lower() for s in manifest.column("split").to_pylist()]
    for u, value in zip(uris, split, strict=True):
        if value not in SPLITS:
            raise ConfigError(
                f"the split column of {manifest_uri} says {value!r} for {u}: each row must be train, val or test"
            )
    return split


def _stratified_split(keys: list[str], labels: list[str], task: str, data: DataConfig) -> list[str]:
    """Per label, images ranked by a seeded hash of their key: the first test_fraction go to test, the next
    val_fraction to val, the rest to train. Test depends only on (seed, test_fraction), so changing val_fraction
    never moves an image into or out of test. Images sharing a key (one IIIF object's views) go together: whole keys
    are taken until a split holds its share, and train always keeps at least one key."""
    rows_by_label: dict[str, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        rows_by_label[label].append(row)
    split = ["train"] * len(keys)
    with_test = data.test_fraction > 0
    smallest = min(sorted(rows_by_label), key=lambda label: len(rows_by_label[label]))
    if len(rows_by_label[smallest]) < 2 + with_test:
        fix = "set data.test_fraction=0 (no test split: figures are then validation figures), " if with_test else ""
        raise ConfigError(
            f"label '{smallest}' of task '{task}' has {len(rows_by_label[smallest])} image(s); at least "
            f"{2 + with_test} are needed to split into {'train, val and test' if with_test else 'train and val'}: "
            f"add images, drop the label, {fix}or give the manifest a split column"
        )
    for rows in rows_by_label.values():
        n_test = min(len(rows) - 2, max(1, round(len(rows) * data.test_fraction))) if with_test else 0
        n_val = min(len(rows) - 1 - n_test, max(1, round(len(rows) * data.val_fraction)))
        ranked = sorted(rows, key=lambda row: hashlib.sha256(f"{data.seed}\0{keys[row]}".encode()).digest())
        test_end = _take_whole_keys(ranked, keys, 0, n_test)
        val_end = _take_whole_keys(ranked, keys, test_end, n_val)
        for row in ranked[:test_end]:
            split[row] = "test"
        for row in ranked[test_end:val_end]:
            split[row] = "val"
    return split


def _fold_split(keys: list[str], labels: list[str], split: list[str], task: str, data: DataConfig) -> list[str]:
    """Fold `data.fold` of `data.folds` as val, the other folds as train; the test split's rows are LEFT_OUT.

    Per label, the non-test keys ranked by a seeded hash are dealt to the folds in turn, so each fold holds each label's
    share to within one key; the turn carries over from label to label, so the folds' sizes differ by at most one key.
    A key's images (one IIIF object's views) share a fold."""
    keys_by_label: dict[str, dict[str, None]] = defaultdict(dict)  # ordered sets
    for row, label in enumerate(labels):
        if split[row] != "test":
            keys_by_label[label][keys[row]] = None
    for label in sorted(keys_by_label):
        if len(keys_by_label[label]) < data.folds:
            raise ConfigError(
                f"label '{label}' of task '{task}' has {len(keys_by_label[label])} image(s) outside the test split; "
                f"data.folds={data.folds} needs at least one per fold: ask for fewer folds or add images"
            )
    fold_of: dict[str, int] = {}
    turn = 0
    for label in sorted(keys_by_label):
        for key in sorted(
            keys_by_label[label], key=lambda k: hashlib.sha256(f"{data.seed}\0fold\0{k}".encode()).digest()
        ):
            fold_of[key] = turn % data.folds
            turn += 1
    return [
        LEFT_OUT if s == "test" else "val" if fold_of[key] == data.fold else "train"
        for s, key in zip(split, keys, strict=True)
    ]


def _take_whole_keys(ranked: list[int], keys: list[str], start: int, n: int) -> int:
    """Where a split that starts at `ranked[start]` ends: at least `n` rows, then to the end of the last key taken
    (a key's rows are adjacent: they share its hash), but never the last key, which stays in train."""
    end = start
    while end < len(ranked) and (end - start < n or (end > start and keys[ranked[end]] == keys[ranked[end - 1]])):
        end += 1
    if end == len(ranked):  # one object's views would take the rest of the label: that object stays in train
        last = keys[ranked[-1]]
        while end > start and keys[ranked[end - 1]] == last:
            end -= 1
    return end


def _key_below(root: str, uri: str) -> str:
    """`uri` relative to `root` when below it (so copies of a collection agree), else `uri` itself."""
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def _is_reserved(column: str) -> bool:
    # pandas leaves "Unnamed: 0" index columns in CSVs and "__index_level_0__" in Parquet
    return column.lower() in RESERVED_COLUMNS or column.startswith(("Unnamed:", "__"))


def _is_hidden(key: str) -> bool:
    return any(part.startswith(".") for part in key.split("/"))
