#!/usr/bin/env bash
# The cross-validated table of docs/measurements.md (fusion against its branches, K = 5), run fold by fold and kept:
# after each fold's runs, their small files are committed, so a table stopped midway resumes from the repository on
# any machine (ablate skips every run whose record is there). Run it from a checkout of main:
#
#   ARTFUSE_PAINTINGS=../shared/data/paintings bash scripts/fold_table.sh [set ...]
#
# Environment: ARCHS (default "fusion cnn_only"; transformer_only is run for two folds first, see below), FOLDS (5),
# CODE (a checkout whose artfuse runs the trainings; default this one), LOCK (a file held with flock around each
# training, so that nothing else heavy runs beside it on a small machine; default none).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
paintings=$(realpath "${ARTFUSE_PAINTINGS:?set ARTFUSE_PAINTINGS to the folder holding the painting sets}")
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(western-genre chinese-genre)
archs=${ARCHS:-fusion cnn_only}
folds=${FOLDS:-5}
code=${CODE:-$repo}
python=${PYTHON:-$repo/.venv/bin/python}

commit() {  # the runs' small files only (.gitignore keeps weights, checkpoints and plots out)
  local out=$1 message=$2
  git -C "$repo" add "$out"
  if ! git -C "$repo" diff --cached --quiet -- "$out"; then
    for _ in 1 2 3 4 5; do  # another git command may hold the index for a moment
      git -C "$repo" commit -q -m "$message" -- "$out" && return 0
      sleep 3
    done
    echo "could not commit $out" >&2
    return 1
  fi
}

train() {  # ablate <set> <first folds> <archs...>
  local set=$1 first=$2
  shift 2
  local out="measurements/folds/$set/default"
  local command=(env PYTHONPATH="$code" "$python" -m artfuse.cli ablate --data "$paintings/$set" --out "$repo/$out"
    --folds "$folds" --first-folds "$first" --archs "$@")
  echo "$(date -u +%FT%TZ) $set folds < $first: $*"
  # From CODE: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
  if [ -n "${LOCK:-}" ]; then (cd "$code" && flock "$LOCK" "${command[@]}"); else (cd "$code" && "${command[@]}"); fi
  commit "$out" "folds: $set $* through fold $((first - 1)) (scripts/fold_table.sh)"
  sleep "${PAUSE_S:-0}"  # lets whoever waits on LOCK take it between folds
}

for set in "${sets[@]}"; do
  for ((k = 1; k <= folds; k++)); do
    train "$set" "$k" $archs
  done
done
# transformer_only: two folds of each set first; the rule may stop it there (docs/measurements.md)
if [ "${TRANSFORMER_FOLDS:-2}" -gt 0 ]; then
  for set in "${sets[@]}"; do
    for ((k = 1; k <= ${TRANSFORMER_FOLDS:-2}; k++)); do
      train "$set" "$k" transformer_only
    done
  done
fi
