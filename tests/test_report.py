"""The run report: two nights of labelling (the second through `artfuse label --report`), the page opened in a real
browser (Debian's headless Chromium, driven by Playwright), and the same page made from an s3:// output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from artfuse.bench.label import save_untrained_package
from artfuse.cli import main
from artfuse.config import load_config
from artfuse.data import storage
from artfuse.data.samples import generate_samples
from artfuse.pipelines.label import label
from artfuse.reporting import report

SETTINGS = [
    "model.img_size=64",
    "model.d_model=32",
    "model.depth=1",
    "model.pretrained=none",
    "label.batch_size=16",
    "label.decode_batch_size=8",
    "label.rows_per_file=16",
    "label.actor_memory_mb=1024",  # schedulable on a busy 2-core machine whose Ray sees little free memory
]
ODD_NAME = "<b>bold & 'quoted'.png"  # archive names can hold markup: the page must show it, not obey it
CARDS = 6  # review thumbnails on the page (fewer than the rows to review, to see the bound)


@pytest.fixture(scope="module")
def nights(tmp_path_factory, ray_local) -> dict:
    """Night one labels 12 images; night two, through the CLI with --report, 6 new ones, two broken files, a copy
    of a night-one image under a new name and a file whose name is markup. Every prediction of the untrained
    package is unsure (its scores are near 1/6, under the 0.5 fallback threshold)."""
    root = tmp_path_factory.mktemp("nights")
    archive, out = root / "archive", root / "labels"
    package = save_untrained_package(str(root / "model"), load_config(None, SETTINGS), {"label": 6})
    generate_samples(str(archive / "night1"), n=12, size_range=(96, 128), seed=1)
    first = label(package, str(archive), str(out), load_config(None, SETTINGS))
    (out / "notes.txt").write_text("a person's file beside the predictions: left alone, and not read\n")

    generate_samples(str(archive / "night2"), n=6, size_range=(96, 128), seed=2)
    night_one = sorted(p for p in (archive / "night1").rglob("*") if p.is_file())
    shutil.copy(night_one[0], archive / "night2" / "copy-of-first.png")
    shutil.copy(night_one[1], archive / "night2" / ODD_NAME)
    (archive / "night2" / "empty.jpg").write_bytes(b"")
    (archive / "night2" / "notes.jpg").write_bytes(b"not an image at all\n")
    args = ["label", "--model", package, "--input", str(archive), "--out", str(out), "--report"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "MAX_REVIEW_CARDS", CARDS)
        assert main([*args, *(f"--set={s}" for s in SETTINGS)]) == 0
    second = json.loads(max((out / "_reports").glob("*.json")).read_text())
    return {"out": out, "first": first, "second": second, "copied": (night_one[0], night_one[1])}


def parquet_counts(out: Path, run_id: str) -> dict:
    rows = pads.dataset(sorted(out.rglob(f"artfuse-{run_id}_*.parquet")), format="parquet").to_table()
    failed = rows["error"].null_count
    return {
        "labelled": failed,
        "failed": rows.num_rows - failed,
        "review": pc.sum(rows["needs_review"]).as_py(),
    }


def test_label_report_page_in_a_browser(nights, browser, tmp_path):
    out, second = nights["out"], nights["second"]
    page_path = out / "_reports" / f"{second['run_id']}.html"
    assert page_path.is_file()
    expected = parquet_counts(out, second["run_id"])
    assert expected == {"labelled": 8, "failed": 2, "review": 10}  # 6 new + copy + odd name; empty and notes failed

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(page_path.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert problems == []

    images = page.eval_on_selector_all("img", "all => all.map(i => [i.complete, i.naturalWidth, i.src.slice(0, 5)])")
    assert images and all(done and width > 0 and src == "data:" for done, width, src in images)
    # bounded: the review cards, one per duplicate group (two), two plots for the one task
    assert len(images) == CARDS + 2 + 2

    tiles = {
        name: int(page.inner_text(f'[data-count="{name}"] .value').replace(",", ""))
        for name in ("listed", "skipped", "labelled", "failed", "review")
    }
    assert tiles == expected | {"listed": second["listed"], "skipped": second["skipped"]}
    assert (tiles["listed"], tiles["skipped"]) == (22, 12)

    cards = page.eval_on_selector_all(".card", "all => all.map(c => c.dataset.uri)")
    assert len(cards) == CARDS and len(set(cards)) == CARDS
    assert "the 6 least confident shown" in page.inner_text("#review")

    reasons = page.eval_on_selector_all("tr[data-reason]", "rows => rows.map(r => r.dataset.reason)")
    assert sorted(reasons) == ["empty", "not_an_image"]
    assert "notes.jpg" in page.inner_text('tr[data-reason="not_an_image"]')

    groups = page.eval_on_selector_all(".group", "all => all.map(g => g.innerText)")
    first, odd = nights["copied"]  # two night-one images, each now also under a new name
    assert sorted(g.count("/archive/") for g in groups) == [2, 2]
    assert any(str(first) in g and "copy-of-first.png" in g for g in groups)
    assert any(str(odd) in g and ODD_NAME in g for g in groups)
    assert page.locator("b").count() == 0  # the markup in a file name stays text
    labels = page.inner_text('table[data-task="label"]')
    assert "this run" in labels and "earlier runs" in labels
    page.close()


def test_report_on_an_s3_output_matches_the_local_one(nights, s3_bucket):
    out = nights["out"]
    prefix = f"s3://{s3_bucket}/labels"
    for path in out.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{prefix}/{path.relative_to(out).as_posix()}", path.read_bytes())
    cfg = load_config(None, SETTINGS)
    run_id = nights["second"]["run_id"]
    pages = f"s3://{s3_bucket}/pages"
    made = report.write_report(prefix, f"{pages}/latest.html", cfg)  # the latest run by default
    assert made["run_id"] == run_id and made["bytes"] < 400_000
    local = report.write_report(str(out), str(out / "_reports" / "again.html"), cfg, run_id=run_id)
    assert made["counts"] == local["counts"]
    html = storage.read_bytes(f"{pages}/latest.html").decode()
    assert run_id in html and html.count("data:image/") >= 3

    first = report.write_report(prefix, f"{pages}/first.html", cfg, run_id=nights["first"]["run_id"])
    assert first["counts"] == {"listed": 12, "skipped": 0, "labelled": 12, "failed": 0, "review": 12}


def test_report_cli_errors_are_one_line(nights, tmp_path, capsys):
    assert main(["report", "--predictions", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no run reports" in capsys.readouterr().err
    args = ["report", "--predictions", str(nights["out"]), "--run", "no-such-run", "--out", str(tmp_path / "r.html")]
    assert main(args) == 2
    assert "no run no-such-run" in capsys.readouterr().err
