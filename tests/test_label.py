"""The labelling job: one row per listed input per run, incremental reruns, S3, the Ray Data plan, GPU-decode layout.

A tiny untrained model keeps these fast: labels are random, the contract is what is tested.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from artfuse.bench.label import save_untrained_package
from artfuse.config import ConfigError, LabelConfig, load_config
from artfuse.data import gpudecode, stages, storage
from artfuse.data.catalog import list_inputs
from artfuse.data.samples import generate_samples
from artfuse.pipelines.label import (
    LabelModel,
    label,
    prediction_dataset,
    prediction_rows,
    prediction_schema,
    read_output,
)

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
# actor_memory_mb: the tiny model needs little, and a busy machine's Ray may see under the default 4 GB + a decode task
# free (the job would then refuse to start: cluster/requests.py)
FAST = ["label.batch_size=16", "label.decode_batch_size=8", "label.rows_per_file=16", "label.actor_memory_mb=1024"]
SMALL = (96, 160)  # generated image sides
BAD = {"empty.jpg": "empty", "notes.jpg": "not_an_image", "cut.jpg": "truncated"}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    return save_untrained_package(str(tmp_path_factory.mktemp("pkg") / "model"), load_config(None, TINY), {"label": 6})


def jpeg(seed: int, size: tuple[int, int] = (120, 90), **save) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def salt(folder: Path) -> None:
    """Bad inputs beside the good ones, plus files the job must not list."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"just some text, not an image\n")
    (folder / "cut.jpg").write_bytes(jpeg(1)[:1500])
    (folder / "really_a_jpeg.png").write_bytes(jpeg(2))  # the extension lies; the content decides
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "README.txt").write_text("not an input")


def outputs(out: Path) -> pa.Table:
    return pads.dataset(out, format="parquet", partitioning="hive", ignore_prefixes=["_", "."]).to_table()


def test_prediction_rows_topk_review_errors_and_embeddings():
    batch = {
        "uri": np.array(["a", "b", "c"], dtype=object),
        "size": np.array([1, 2, 3]),
        "etag": np.array(["e1", "e2", "e3"], dtype=object),
        "sha256": np.array(["h1", "h2", "h3"], dtype=object),
        "width": np.array([10, 0, 30], dtype=np.int32),
        "height": np.array([10, 0, 30], dtype=np.int32),
        "format": np.array(["JPEG", None, "PNG"], dtype=object),
        "error": np.array([None, "corrupt: bad", None], dtype=object),
    }
    probs = np.array([[0.1, 0.7, 0.2], [0.4, 0.35, 0.25]], dtype=np.float32)  # rows a and c
    embedding = np.arange(8, dtype=np.float16).reshape(2, 4)
    cfg = LabelConfig(topk=2, embeddings=True)
    at = datetime(2026, 1, 2, tzinfo=UTC)
    table = prediction_rows(
        batch,
        {"style": probs, "embedding": embedding},
        tasks={"style": ["x", "y", "z"]},
        cfg=cfg,
        review_thresholds={"style": 0.5},
        model_id="m",
        run_id="r",
        labelled_at=at,
    )
    assert table.schema == prediction_schema({"style": ["x", "y", "z"]}, 4)
    rows = table.to_pylist()
    assert [r["style"] for r in rows] == ["y", None, "x"]
    assert [r["style_topk"] and [t["label"] for t in r["style_topk"]] for r in rows] == [["y", "z"], None, ["x", "y"]]
    assert rows[0]["style_score"] == pytest.approx(0.7) and rows[2]["style_score"] == pytest.approx(0.4)
    assert [r["needs_review"] for r in rows] == [False, True, True]  # confident, failed, unsure
    assert rows[1]["error"] == "corrupt: bad" and rows[1]["embedding"] is None
    assert rows[2]["embedding"] == [4.0, 5.0, 6.0, 7.0]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    assert {r["model_id"] for r in rows} == {"m"} and {r["labelled_at"] for r in rows} == {at}


def test_gpu_decode_stage_sends_plain_jpegs_and_decodes_the_rest(tmp_path):
    rotated = Image.open(io.BytesIO(jpeg(3, (80, 120))))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files = {
        "plain.jpg": jpeg(4, (120, 90)),
        "grey.jpg": _encode(Image.open(io.BytesIO(jpeg(5))).convert("L"), "JPEG"),
        "rotated.jpg": jpeg(3, (80, 120), exif=exif),
        "cmyk.jpg": _encode(Image.open(io.BytesIO(jpeg(6))).convert("CMYK"), "JPEG"),
        "huge.jpg": jpeg(7, (400, 300)),
        "cut.jpg": jpeg(8)[:1500],
        "picture.png": _encode(Image.open(io.BytesIO(jpeg(9))), "PNG"),
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    table = list_inputs(str(tmp_path))
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    kwargs = dict(size=72, max_pixels=10**7, max_bytes=10**6, with_hash=True)
    gpu = stages.read_for_gpu_decode(batch, gpu_max_pixels=100_000, **kwargs)
    cpu = stages.read_and_decode(batch, **kwargs)
    names = [Path(u).name for u in batch["uri"]]
    routes = dict(zip(names, gpu["encoding"], strict=True))
    assert {n for n, r in routes.items() if r == stages.GPU_JPEG} == {"plain.jpg", "grey.jpg"}
    assert routes["cut.jpg"] is None and routes["empty.jpg"] is None  # errors, as on the CPU path
    for key in ("width", "height", "format", "error", "sha256"):
        assert list(gpu[key]) == list(cpu[key]), key

    ok = stages.decoded_ok(gpu["error"])
    images, errors = gpudecode.to_device(
        gpu["encoded"][ok], gpu["encoding"][ok], 72, torch.device("cpu"), max_pixels=10**7
    )
    assert not errors and images.shape == (ok.sum(), 72, 72, 3)
    difference = np.abs(images.numpy().astype(int) - cpu["image"][ok].astype(int))
    assert difference.mean() < 4, "the GPU path's crop and resize must match decode_image's"


def test_jpeg_the_gpu_decoder_refuses_falls_back_to_decode_image(monkeypatch):
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 2)  # rows must stay aligned across decoder calls
    damaged = bytearray(jpeg(10))
    damaged[len(damaged) // 2 : len(damaged) // 2 + 400] = b"\0" * 400  # damaged scan data, markers intact
    images, errors = gpudecode.to_device(
        [bytes(damaged), b"\xff\xd8\xff\xe0 not really", jpeg(11)],
        [stages.GPU_JPEG] * 3,
        32,
        torch.device("cpu"),
        max_pixels=10**7,
    )
    assert list(errors) == [1] and errors[1].startswith(("corrupt", "truncated", "not_an_image"))
    assert images.shape == (3, 32, 32, 3) and images[2].float().std() > 0


def test_label_model_with_gpu_decode_layout_on_cpu(package, tmp_path):
    """The actor's GPU-decode path, run on CPU: same rows, same errors as the CPU-decode path."""
    generate_samples(str(tmp_path / "c"), n=6, size_range=SMALL)
    salt(tmp_path / "c")
    table = list_inputs(str(tmp_path / "c"))
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    cfg = load_config(None, TINY)
    kwargs = dict(size=73, max_pixels=10**7, max_bytes=10**6, with_hash=True)
    at = datetime.now(UTC)
    via_gpu = LabelModel(package, cfg.label, cfg.storage, "r", at, gpu_decode=True)(
        stages.read_for_gpu_decode(batch, gpu_max_pixels=10**7, **kwargs)
    )
    via_cpu = LabelModel(package, cfg.label, cfg.storage, "r", at)(stages.read_and_decode(batch, **kwargs))
    assert via_gpu.schema == via_cpu.schema and via_gpu.num_rows == table.num_rows
    for column in ("uri", "etag", "sha256", "width", "height", "format", "error"):
        assert via_gpu[column].to_pylist() == via_cpu[column].to_pylist(), column
    assert via_gpu["label"].null_count == table.num_rows - via_gpu["error"].null_count == len(BAD)
    np.testing.assert_allclose(
        via_gpu["label_score"].to_numpy(zero_copy_only=False),
        via_cpu["label_score"].to_numpy(zero_copy_only=False),
        atol=0.05,
    )


def test_cpu_bf16_runs_the_model_in_bf16_close_to_fp32(package):
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    at = datetime.now(UTC)
    fp32 = LabelModel(package, load_config(None, TINY).label, None, "r", at).predict(images)["label"]
    bf16 = LabelModel(package, load_config(None, [*TINY, "label.cpu_bf16=true"]).label, None, "r", at)
    probabilities = bf16.predict(images)["label"]
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    difference = np.abs(probabilities - fp32).max()
    assert 0 < difference < 0.05  # bf16 really ran (rounding shows), and agrees with fp32


def test_plan_keeps_decode_out_of_the_model_actor(package, tmp_path, ray_local, capsys, caplog):
    """Equal requests on both stages would let Ray fuse decode into the actor (docs/architecture.md, stage fusion)."""
    generate_samples(str(tmp_path / "c"), n=6, size_range=SMALL)
    settings = ["label.decode_cpus=1", "label.cpus_per_actor=1", "label.gpu_decode=true", "label.actor_memory_mb=1024"]
    cfg = load_config(None, [*TINY, *settings])
    ds = prediction_dataset(list_inputs(str(tmp_path / "c")), package, cfg, run_id="r", labelled_at=datetime.now(UTC))
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(read_and_decode)]" in optimized  # no GPU: CPU decode after all
    assert "ActorPoolMapOperator[MapBatches(LabelModel)]" in optimized
    assert "read_and_decode)->" not in optimized
    assert "gpu_decode is set but label.num_gpus_per_actor is 0" in caplog.text


def test_a_model_actor_asking_what_a_decode_task_asks_is_refused(package, tmp_path):
    """The same CPUs and memory and no GPU would let Ray fuse the two stages: a clear error, not a silent slowdown."""
    generate_samples(str(tmp_path / "c"), n=6, size_range=SMALL)
    same = ["label.cpus_per_actor=1", "label.decode_cpus=1", "label.actor_memory_mb=512"]
    cfg = load_config(None, [*TINY, *same])
    with pytest.raises(ConfigError, match="fuse decode into the model actor"):
        prediction_dataset(list_inputs(str(tmp_path / "c")), package, cfg, run_id="r", labelled_at=datetime.now(UTC))
    with pytest.raises(ConfigError, match="actor_memory_mb must be 0 or more"):
        load_config(None, ["label.actor_memory_mb=-1"])


def test_every_input_gets_one_row_and_reruns_label_only_new_objects(package, tmp_path, ray_local):
    collection, out = tmp_path / "archive", tmp_path / "predictions"
    generate_samples(str(collection), n=24, size_range=SMALL)
    salt(collection)
    cfg = load_config(None, [*TINY, *FAST, "label.topk=2"])

    first = label(package, str(collection), str(out), cfg)
    listed = list_inputs(str(collection))
    assert first["listed"] == listed.num_rows == 28  # 24 samples + 4 salted inputs, not .DS_Store/README.txt
    assert first["labelled"] + first["errors"] == first["listed"] and first["errors"] == len(BAD)
    rows = outputs(out)
    assert sorted(rows["uri"].to_pylist()) == sorted(listed["uri"].to_pylist())
    for field in prediction_schema({"label": [str(i) for i in range(6)]}, None):
        assert rows.schema.field(field.name).type == field.type, field.name
    assert set(rows["run_date"].to_pylist()) == {first["run_date"]} and len(first["run_date"]) == 10
    by_name = {Path(r["uri"]).name: r for r in rows.to_pylist()}
    for name, reason in BAD.items():
        assert by_name[name]["error"].startswith(reason) and by_name[name]["label"] is None
        assert by_name[name]["needs_review"]
    good = [r for r in rows.to_pylist() if r["error"] is None]
    assert by_name["really_a_jpeg.png"]["format"] == "JPEG" and len(good) == 25
    for r in good:
        assert len(r["label_topk"]) == 2 and r["label_topk"][0] == {"label": r["label"], "score": r["label_score"]}
        assert r["label_topk"][0]["score"] >= r["label_topk"][1]["score"]
        # an untrained package has no fitted threshold: `auto` falls back to 0.5
        assert r["needs_review"] == (r["label_score"] < 0.5) and first["review"]["thresholds"] == {"label": 0.5}
        assert len(r["sha256"]) == 64 and r["width"] > 0
    assert first["review"]["rows"] == sum(r["needs_review"] for r in rows.to_pylist())
    assert first["review"]["by_task"]["label"] == sum(r["label_score"] < 0.5 for r in good)
    report = json.loads((out / "_reports" / f"{first['run_id']}.json").read_text())
    assert report == first and report["img_s"] > 0

    again = label(package, str(collection), str(out), cfg)
    assert (again["skipped"], again["labelled"], again["errors"]) == (28, 0, 0)
    assert outputs(out).num_rows == 28

    time.sleep(0.01)  # local etags are mtimes: make sure the rewrite gets a new one
    changed = sorted(collection.glob("cubist/*.jpg"))[0]
    changed.write_bytes(jpeg(12))
    (collection / "new").mkdir()
    (collection / "new" / "a.jpg").write_bytes(jpeg(13))
    (collection / "new" / "b.jpg").write_bytes(b"\xff\xd8\xff broken")
    third = label(package, str(collection), str(out), cfg)
    assert (third["listed"], third["skipped"], third["labelled"], third["errors"]) == (30, 27, 2, 1)
    mine = outputs(out).filter(pads.field("run_id") == third["run_id"])
    assert sorted(mine["uri"].to_pylist()) == sorted(str(p) for p in (changed, *(collection / "new").iterdir()))


def test_s3_input_and_output_with_embeddings(package, s3_bucket, ray_local):
    collection, out = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/labels"
    generate_samples(collection, n=12, size_range=SMALL)
    storage.write_bytes(f"{collection}/incoming/broken.jpg", b"\xff\xd8\xff\xe0 cut short")
    model = f"s3://{s3_bucket}/models/tiny"
    cfg = load_config(None, [*TINY, *FAST, "label.embeddings=true"])
    save_untrained_package(model, cfg, {"label": 6})

    report = label(model, collection, out, cfg)
    assert (report["listed"], report["labelled"], report["errors"]) == (13, 12, 1)
    fs, root = storage.arrow_filesystem(out, cfg.storage)
    rows = read_output(fs, root, ["uri", "embedding", "error"])
    assert sorted(rows["uri"].to_pylist()) == sorted(list_inputs(collection)["uri"].to_pylist())
    embedding_type = rows.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding_type) and embedding_type.value_type == pa.float16()
    assert embedding_type.list_size > 0
    assert rows.filter(pads.field("error").is_null())["embedding"].null_count == 0
    assert storage.exists(f"{out}/_reports/{report['run_id']}.json", cfg.storage)

    again = label(model, collection, out, cfg)
    assert (again["skipped"], again["labelled"] + again["errors"]) == (13, 0)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_decode_niceness_lowers_the_decode_worker_priority_once(tmp_path):
    import subprocess
    import sys

    # In a process of its own: a lowered priority cannot be raised again, and pytest should keep its own.
    (tmp_path / "a.jpg").write_bytes(jpeg(0, (40, 30)))
    script = f"""
import os, numpy as np
from artfuse.data import stages
batch = {{"uri": np.array([{str(tmp_path / "a.jpg")!r}], dtype=object), "size": np.array([1])}}
for _ in range(2):
    out = stages.read_and_decode(batch, size=16, max_pixels=10**6, max_bytes=10**6, niceness=7)
print(os.getpriority(os.PRIO_PROCESS, 0), out["image"].shape, out["error"][0])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "7" and "(1, 16, 16, 3)" in done.stdout
