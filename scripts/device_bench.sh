#!/usr/bin/env bash
# The GPU figures in one call on a GPU machine (at most 8 minutes, at most 8 files back): `artfuse bench` with CPU
# decode, then with nvJPEG decode (label.gpu_decode), on generated 1024x768 JPEGs, each pipeline run long enough for
# >= 20k images; `artfuse bench --train` (the training step alone and the Ray Train loop); and `artfuse bench
# --simulate` on the same machine, to set the simulation's figures beside the card's.
#
# The device has no internet: carry Ray's site-packages as a tarball in .devbundle/ (git-ignored, built from the
# lock, no weights: the runs use model.pretrained=none).
# Device tool:  run  command="bash scripts/device_bench.sh"  carry=[".devbundle"]  timeout_s=540
# What comes back in $OUT (7 files): gpu.txt (nvidia-smi, versions), bench-cpu-decode.json, bench-gpu-decode.json,
# bench-train.json, simulate.json, summary.txt (each goal met or missed), logs.tar.gz (every log, Ray Data stats
# included).
#
# Without a GPU (a rehearsal on a CPU machine) the same steps run; set SMALL=1 for a tiny model and short runs:
#   SMALL=1 OUT=/tmp/device-rehearsal bash scripts/device_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/artfuse-device}
mkdir -p "$out"
if [ -f .devbundle/ray-site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .devbundle/ray-site.tar.xz -C /tmp/site
  # Ray's vendored psutil is what artfuse.bench.label imports there (the GPU image has no psutil of its own).
  export PYTHONPATH=/tmp/site:/tmp/site/ray/thirdparty_files:$PWD
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") > "$out/gpu.txt" 2>&1
"$py" - <<'EOF' | tee -a "$out/gpu.txt"
import os, ray, torch, torchvision, timm, artfuse.bench.label
print("python", os.sys.version.split()[0], "ray", ray.__version__, "torch", torch.__version__,
      "torchvision", torchvision.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available(),
      "cpus", os.cpu_count())
EOF

# Large batches on a GPU; decode blocks as large, so each decode task's fixed cost weighs little. The pipeline
# labels what min(model, decode) gets through in PIPELINE_SECONDS: at the DESIGN anchors (>= 1,000 img/s), 40 s
# is >= 40k images. DECODE_IMAGES: JPEGs decoded alone, split over every CPU.
sets=(--set "label.batch_size=${BATCH:-256}" --set "label.decode_batch_size=${BATCH:-256}"
      --set "bench.pipeline_seconds=${PIPELINE_SECONDS:-40}" --set "bench.n_images=${DECODE_IMAGES:-4096}"
      --set "bench.model_batches=${MODEL_BATCHES:-20}")
if [ "${SMALL:-0}" = 1 ]; then
  sets=(--set label.batch_size=16 --set label.decode_batch_size=16 --set bench.pipeline_seconds=0
        --set bench.n_images=64 --set bench.model_batches=2 --set model.img_size=64 --set model.d_model=32
        --set model.depth=1 --set model.pretrained=none)
fi

train_sets=(--set model.pretrained=none --set "train.batch_size=${TRAIN_BATCH:-64}" --set bench.train_images=2000)
if [ "${SMALL:-0}" = 1 ]; then
  train_sets=(--set model.pretrained=none --set train.batch_size=4 --set bench.train_images=30
              --set model.img_size=64 --set model.d_model=32 --set model.depth=1 --set bench.model_batches=2)
fi
logs=$(mktemp -d)
trap 'tar -czf "$out/logs.tar.gz" -C "$logs" .' EXIT
step() {  # name, seconds, command...: its log into the tarball, its last lines here
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" "$@" > "$logs/$name.log" 2>&1 || echo "$name failed or timed out (exit $?)" | tee -a "$out/summary.txt"
  tail -4 "$logs/$name.log"
}
for path in cpu gpu; do
  gpu_decode=$([ $path = gpu ] && echo true || echo false)
  step "bench-$path-decode" 150 "$py" -m artfuse.cli -v bench --out "$out/bench-$path-decode.json" "${sets[@]}" \
    --set "label.gpu_decode=$gpu_decode" --set model.pretrained=none
done
step bench-train 150 "$py" -m artfuse.cli bench --train --out "$out/bench-train.json" "${train_sets[@]}"
step simulate 90 "$py" -m artfuse.cli -v bench --simulate --out "$out/simulate.json" --set bench.pipeline_seconds=10

"$py" - "$out" <<'EOF' | tee -a "$out/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    path = f"{out}/{name}.json"
    return json.load(open(path)) if os.path.exists(path) else None
cpu, gpu, train, sim = (load(n) for n in ("bench-cpu-decode", "bench-gpu-decode", "bench-train", "simulate"))
def goal(name, value, target, higher=True, unit=""):
    if value is None:
        print(f"{name}: not measured")
        return
    met = value >= target if higher else value < target
    print(f"{name}: {value:,.2f}{unit} ({'>=' if higher else '<'} {target}{unit}) {'MET' if met else 'MISSED'}")
if cpu:
    print(f"device: {cpu['machine'].get('gpu') or cpu['machine']['device']}, {cpu['machine']['cpus']} CPUs")
    print(f"model alone {cpu['model_img_s']} img/s, CPU decode alone {cpu['decode_img_s']} img/s,"
          f" CPU-decode pipeline {cpu['pipeline_img_s']} img/s over {cpu['counts']['pipeline_images']} images")
goal("CPU-decode pipeline / min(model, CPU decode)", cpu and cpu["ratio"], 0.85)
if gpu:
    print(f"nvJPEG alone {gpu['gpu_decode_img_s']} img/s, GPU-decode pipeline {gpu['pipeline_img_s']} img/s"
          f" over {gpu['counts']['pipeline_images']} images")
goal("GPU-decode pipeline", gpu and gpu["pipeline_img_s"], 4000, unit=" img/s")
if train:
    print(f"train step alone {train['step_img_s']} img/s, Ray Train loop {train['loop_img_s']} img/s")
goal("Ray Train loop / step alone", train and train["ratio"], 0.7)
goal("train warm-up to the first optimizer step", train and train["warmup_s"], 10, higher=False, unit=" s")
if sim:
    for path in ("cpu_decode", "gpu_decode"):
        print(f"simulated here, {path}: {sim[path]['pipeline_img_s']} img/s, ratio {sim[path]['ratio']}")
for name, r in (("cpu", cpu), ("gpu", gpu)):
    if r and r["counts"]["pipeline_images"] < 20000:
        print(f"note: the {name}-decode run labelled {r['counts']['pipeline_images']} images, fewer than 20k")
EOF
