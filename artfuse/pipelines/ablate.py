"""The paper's ablation on any collection: fusion vs cnn_only vs transformer_only, same data, budget and seed.

Writes `ablation.md` and `ablation.csv` (accuracy, macro-F1, parameters, training img/s) and one package per
architecture under `<out>/<arch>`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import time

from artfuse.config import Config
from artfuse.data import storage
from artfuse.models import create_model
from artfuse.pipelines.train import export_package, make_trainer, prepare_inputs, preprocess_for

ARCHS = ("fusion", "cnn_only", "transformer_only")
COLUMNS = ("arch", "val_accuracy", "val_macro_f1", "params_m", "train_img_s", "best_epoch", "minutes")


def ablate(data_uri: str, out_uri: str, cfg: Config, archs: tuple[str, ...] = ARCHS) -> list[dict]:
    inputs = prepare_inputs(data_uri, cfg)  # decoded once, shared by every architecture
    rows = []
    for arch in archs:
        started = time.time()
        arch_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=arch))
        arch_inputs = dataclasses.replace(inputs, preprocess=preprocess_for(arch_cfg))  # each backbone's mean/std
        result = make_trainer(arch_inputs, arch_cfg, storage.join(out_uri, "_train"), name=arch).fit()
        summary = export_package(result, arch_inputs, arch_cfg, storage.join(out_uri, arch))
        model = create_model(arch_cfg.model, {t: len(v) for t, v in inputs.vocabs.items()}, load_pretrained=False)
        rows.append(
            {
                "arch": arch,
                "val_accuracy": round(summary["val_accuracy"], 4),
                "val_macro_f1": round(summary["val_macro_f1"], 4),
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                "train_img_s": round(statistics.median(summary["train_img_s_by_epoch"]), 1),
                "best_epoch": summary["best_epoch"],
                "minutes": round((time.time() - started) / 60, 1),
            }
        )
        # Rewritten after every architecture, so a long ablation shows its finished rows while it runs.
        storage.write_bytes(storage.join(out_uri, "ablation.csv"), to_csv(rows).encode(), cfg.storage)
        storage.write_bytes(
            storage.join(out_uri, "ablation.md"), to_markdown(rows, data_uri, cfg).encode(), cfg.storage
        )
    return rows


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict], data_uri: str, cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    lines = [
        f"# Ablation on {data_uri}",
        "",
        f"Same split (seed {cfg.data.seed}, val {cfg.data.val_fraction}), {t.epochs} epochs, batch {t.batch_size}, "
        f"{m.img_size} px, backbone {m.backbone} ({m.pretrained}), fusion {m.fusion}, d_model {m.d_model}, "
        f"depth {m.depth}. Validation figures are the best epoch's.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"
