"""Linear-probe reference on a collection's own split: logistic regression on the pooled features of the configured
pretrained backbone (the kind of reference figure docs/measurements.md quotes), at one or more input sizes; its L2
penalty is chosen on val, its accuracy reported on val and test.

    python scripts/linear_probe.py $ARTFUSE_PAINTINGS/western-genre --sizes 160 224 288

Images are decoded with artfuse's decoder (shorter side to the size, centre crop), on this process's CPU.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from artfuse.config import load_config
from artfuse.data.catalog import load_collection
from artfuse.data.images import decode_image
from artfuse.data.preprocess import Preprocess
from artfuse.data.storage import read_bytes
from artfuse.models import data_config
from artfuse.models.fusion import create_cnn
from artfuse.models.weights import load_backbone_weights, timm_backbone_name

L2_PENALTIES = (1e-4, 1e-3, 1e-2)


def features(model: torch.nn.Module, uris: list[str], preprocess: Preprocess) -> torch.Tensor:
    images = np.stack([decode_image(read_bytes(u), preprocess.img_size).array for u in uris])
    with torch.inference_mode():
        return torch.cat([model(preprocess.to_tensor(images[i : i + 64])) for i in range(0, len(images), 64)])


def probe_accuracy(train: torch.Tensor, y_train: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor, l2: float):
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mean) / std, (val - mean) / std
    w = torch.zeros(train.shape[1], int(y_train.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500)

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(train @ w + b, y_train) + l2 * (w**2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return ((val @ w + b).argmax(1) == y_val).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="collection URI")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--set", action="append", default=[], help="config override, as for artfuse")
    args = parser.parse_args()
    cfg = load_config(None, args.set)
    collection = load_collection(args.data, cfg.data)
    task = collection.tasks[0]
    train, val, test = (collection.subset(s) for s in ("train", "val", "test"))
    vocab = collection.vocabs[task]
    y_train, y_val, y_test = (torch.tensor([vocab.index(v) for v in t[task].to_pylist()]) for t in (train, val, test))
    model = create_cnn(timm_backbone_name(cfg.model), num_classes=0)
    load_backbone_weights(model, cfg.model)
    model.eval()
    dc = data_config(cfg.model)
    for size in args.sizes:
        preprocess = Preprocess.for_model(size, dc["mean"], dc["std"])
        f_train = features(model, train["uri"].to_pylist(), preprocess)
        f_val = features(model, val["uri"].to_pylist(), preprocess)
        f_test = features(model, test["uri"].to_pylist(), preprocess)
        val_acc = [probe_accuracy(f_train, y_train, f_val, y_val, l2) for l2 in L2_PENALTIES]
        l2 = L2_PENALTIES[max(range(len(val_acc)), key=val_acc.__getitem__)]  # chosen on val, reported on test
        test_acc = probe_accuracy(f_train, y_train, f_test, y_test, l2)
        print(
            f"{args.data} {task} {cfg.model.backbone} {size} px: val accuracy "
            f"{[round(a, 3) for a in val_acc]} at L2 {list(L2_PENALTIES)}; test {test_acc:.3f} at L2 {l2}",
            flush=True,
        )


if __name__ == "__main__":
    main()
