#!/usr/bin/env bash
# Issue #5's GPU figures in one call on the lent GPU machine: `artfuse bench` with CPU decode, then with nvJPEG
# decode (label.gpu_decode), on generated 1024x768 JPEGs, each pipeline run long enough for >= 20k images.
#
# Here, once:   bash ../shared/tools/device-ray-bundle.sh            (builds .devbundle/, ~32 MB, git-ignored)
# Device tool:  run  command="bash scripts/device_bench.sh"  carry=[".devbundle"]  timeout_s=540
# What comes back in $OUT: bench-cpu-decode.json, bench-gpu-decode.json, their logs (Ray Data stats included),
# gpu.txt (nvidia-smi), summary.txt (the acceptance ratios, computed from the two JSON files).
#
# Without a GPU (a rehearsal on a CPU machine) the same steps run; set SMALL=1 for a tiny model and short runs:
#   SMALL=1 OUT=/tmp/device-rehearsal bash scripts/device_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/artfuse-device}
mkdir -p "$out"
if [ -f .devbundle/ray-site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .devbundle/ray-site.tar.xz -C /tmp/site
  # Ray's vendored psutil is what artfuse.pipelines.bench imports there (the GPU image has no psutil of its own).
  export PYTHONPATH=/tmp/site:/tmp/site/ray/thirdparty_files:$PWD
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") > "$out/gpu.txt" 2>&1
"$py" - <<'EOF' | tee -a "$out/gpu.txt"
import os, ray, torch, torchvision, timm, artfuse.pipelines.bench
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

for path in cpu gpu; do
  gpu_decode=$([ $path = gpu ] && echo true || echo false)
  "$py" -m artfuse.cli -v bench --out "$out/bench-$path-decode.json" "${sets[@]}" \
    --set "label.gpu_decode=$gpu_decode" > "$out/bench-$path-decode.log" 2>&1 \
    || { echo "bench ($path decode) failed:"; tail -30 "$out/bench-$path-decode.log"; exit 1; }
  tail -6 "$out/bench-$path-decode.log"
done

"$py" - "$out" <<'EOF' | tee "$out/summary.txt"
import json, sys
out = sys.argv[1]
cpu, gpu = (json.load(open(f"{out}/bench-{p}-decode.json")) for p in ("cpu", "gpu"))
limit = min(cpu["model_img_s"], cpu["decode_img_s"])
print(f"device: {cpu['machine'].get('gpu') or cpu['machine']['device']}, {cpu['machine']['cpus']} CPUs")
print(f"model alone {cpu['model_img_s']} img/s, CPU decode alone {cpu['decode_img_s']} img/s,"
      f" nvJPEG alone {gpu['gpu_decode_img_s']} img/s")
print(f"CPU-decode pipeline {cpu['pipeline_img_s']} img/s over {cpu['counts']['pipeline_images']} images:"
      f" {cpu['ratio']:.3f} of min(model, CPU decode) (target >= 0.85)")
print(f"GPU-decode pipeline {gpu['pipeline_img_s']} img/s over {gpu['counts']['pipeline_images']} images:"
      f" {gpu['pipeline_img_s'] / limit:.2f}x the CPU-decode limit {limit:.1f} img/s (target >= 1.5)")
for p, r in (("cpu", cpu), ("gpu", gpu)):
    if r["counts"]["pipeline_images"] < 20000:
        print(f"note: the {p}-decode run labelled {r['counts']['pipeline_images']} images, fewer than 20k")
EOF
