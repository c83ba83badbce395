#!/usr/bin/env bash
# The espeak-ng comparison of experiments/README_asr.md: every decoder on the same corpus, epochs, batch and seed,
# one after another in this one script (so the wall times share a machine state as far as possible).
#
#   python -m experiments.asr synth --engine espeak --out data/espeak --clips 1000 --seed 0
#   bash experiments/asr/espeak_runs.sh                 # CORPUS=data/espeak RUNS=runs/espeak EPOCHS=15 WARMUP=2
#   EPOCHS=5 WARMUP=0 DECODERS="transformer taylor hybrid lstm" bash experiments/asr/espeak_runs.sh   # the README runs
#
# Frames are cropped to the corpus' longest clip (corpus.json "max_frames"), so nothing is cut and the padding is
# as short as a fixed size allows. --mask-padding auto: on for taylor and hybrid, off (the course) for lstm/transformer.
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS=${CORPUS:-data/espeak}
RUNS=${RUNS:-runs/espeak}
EPOCHS=${EPOCHS:-15}
WARMUP=${WARMUP:-2}
DECODERS=${DECODERS:-"transformer taylor hybrid lstm hybrid-taylor-cross"}
MAX_FRAMES=$(python -c "import json; print(json.load(open('$CORPUS/corpus.json'))['max_frames'])")
COMMON=(--corpus-dir "$CORPUS" --cache-dir "$RUNS/features" --max-frames "$MAX_FRAMES" --epochs "$EPOCHS"
        --batch-size 16 --eval-batch-size 16 --warmup-epochs "$WARMUP" --decay-epochs $((EPOCHS - WARMUP)) --lr 1e-3
        --seed 42 --num-workers 0 --no-progress --mask-padding auto)
echo "# $(date -u +%FT%TZ) $(lscpu | grep 'Model name' | sed 's/  */ /g') | max_frames $MAX_FRAMES | decoders: $DECODERS"
dirs=()
for name in $DECODERS; do
  case "$name" in
    hybrid-taylor-cross) args=(--decoder hybrid --cross-attention taylor) ;;
    hybrid) args=(--decoder hybrid --cross-attention softmax) ;;
    *) args=(--decoder "$name") ;;
  esac
  echo "# $(date -u +%FT%TZ) start $name: ${args[*]}"
  python -m experiments.asr train "${COMMON[@]}" "${args[@]}" --run-dir "$RUNS/$name"
  dirs+=("$RUNS/$name")
  python -m experiments.asr report "${dirs[@]}" --out "$RUNS/table.md"
done
echo "# $(date -u +%FT%TZ) done"
cat "$RUNS/table.md"
