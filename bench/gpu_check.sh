#!/usr/bin/env bash
# The GPU check: everything this project measures on a lent H100/H200, in one script, well under 9 minutes.
#
#   OUT=/path/to/out bash bench/gpu_check.sh        # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run               # anywhere: every stage at tiny size on CPU (TRITON_INTERPRET=1)
#
# Stages (each under its own `timeout`, each capped by what is left of the overall budget; a failing stage is
# recorded and the next one runs):
#   card      nvidia-smi, torch/Triton versions
#   build     MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .   (skipped when linattn_cuda already
#             imports with CUDA kernels, e.g. a build carried along; in --dry-run only printed)
#   peers     pure-Python peer wheels carried in .whl/ (fla-core, einops) installed into /tmp/site, added to PYTHONPATH
#   argcheck  the CUDA ops' argument checks alone in a fresh process (gdb backtrace on a crash)
#   gpu-tests pytest -m gpu tests/test_{triton,cuda,api}.py, junit XML to $OUT/gpu_tests.xml
#   triton    bench/triton_gpu_bench.py <dir>, when that script exists; up to 3 of its files copied to $OUT/triton/
#   scaling   python -m bench.scaling --device cuda (bf16, B=16, H=16, D=16, Dv=64, L 1K…64K) with a time budget
#   summary   a table of the stages, printed last and written to $OUT/summary.md
#
# $OUT receives at most 8 files, at most 2 folder levels: gpu_check.log (every stage's output), summary.md,
# gpu_tests.xml, cuda_scaling.json, cuda_scaling.md, triton/<≤3 files>. Draw the plots afterwards, off the GPU:
#   python -m bench.report <copy of $OUT>/cuda_scaling.json
#
# Environment: OUT (default: a new temporary folder), GPU_CHECK_BUDGET_S (default 500: the whole script),
# GPU_CHECK_DRY_RUN=1 (same as --dry-run), GPU_CHECK_SCALING_ARGS (extra options for bench.scaling),
# MAX_JOBS (default 16), PYTHON (default python3).
set -u
START=$(date +%s)
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
BUDGET="${GPU_CHECK_BUDGET_S:-500}"
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = "1" ]; then
  export TRITON_INTERPRET=1
  echo "DRY RUN: tiny sizes on CPU, TRITON_INTERPRET=1, nothing installed into this Python" | tee -a "$LOG"
fi

STAGES=()
record() {  # name status seconds note
  STAGES+=("$1|$2|$3|$4")
  printf '== %-10s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$LOG"
}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# stage_timeout WANT RESERVE: WANT seconds, or less so that RESERVE seconds remain for the later stages
stage_timeout() {
  local t=$(( $(left) - $2 ))
  [ "$t" -gt "$1" ] && t=$1
  echo "$t"
}
run_stage() {  # name timeout command...   (status: ok / failed (rc) / timeout)
  local name=$1 t=$2; shift 2
  local s0=$(date +%s) rc
  if [ "$t" -lt 5 ]; then STATUS="skipped(no time left)"; LAST_RC=99; LAST_DT=0; return 99; fi
  echo "---- $name (timeout ${t}s): $*" >> "$LOG"
  timeout --kill-after=10 "$t" "$@" >> "$LOG" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - s0 ))
  if [ $rc -eq 0 ]; then STATUS=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STATUS=timeout; else STATUS="failed($rc)"; fi
  LAST_RC=$rc; LAST_DT=$dt
  return $rc
}

# ---- card
s0=$(date +%s)
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 20 nvidia-smi 2>&1 | tee -a "$LOG"
  CARD=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
else
  CARD="no nvidia-smi (CPU only)"
  echo "$CARD" | tee -a "$LOG"
fi
VERSIONS=$(timeout 60 "$PY" -c "import sys, torch; import importlib.metadata as m
try: tv = m.version('triton')
except Exception: tv = 'none'
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {tv}, cuda available {torch.cuda.is_available()}')" 2>&1 | tail -1)
echo "$VERSIONS" | tee -a "$LOG"
record card ok $(( $(date +%s) - s0 )) "${CARD:-unknown}; $VERSIONS"

# ---- triton warm-up: compile every Triton kernel variant the tests and benchmarks launch, in parallel,
# into Triton's cache, in the background while the CUDA extension builds (both use the CPU cores)
WARM_PID=""
if [ "$DRY_RUN" != "1" ] && [ -f tests/triton_compile_check.py ]; then
  ( timeout 240 "$PY" tests/triton_compile_check.py --warm-cuda -j "${TRITON_WARM_JOBS:-8}" > "$OUT/triton_warm.log" 2>&1;
    echo "triton warm-up exit $?" >> "$OUT/triton_warm.log" ) &
  WARM_PID=$!
fi

# ---- build
HAS_CUDA_KERNELS='import linattn_cuda, torch; from linattn_cuda._extension import has_kernel; import sys; sys.exit(0 if has_kernel("CUDA") else 3)'
if timeout 60 "$PY" -c "$HAS_CUDA_KERNELS" >> "$LOG" 2>&1; then
  record build skipped 0 "linattn_cuda already imports with CUDA kernels"
elif [ "$DRY_RUN" = "1" ]; then
  record build skipped 0 "dry run: would run MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e ."
else
  command -v ninja >/dev/null 2>&1 || "$PY" -c "import ninja" 2>/dev/null \
    || echo "warning: ninja not found: the extension builds serially (slow)" | tee -a "$LOG"
  if run_stage build "$(stage_timeout 330 150)" env MAX_JOBS="${MAX_JOBS:-8}" \
      LINATTN_CUDA_ARCHS="${LINATTN_CUDA_ARCHS:-9.0}" "$PY" -m pip install -q \
      --no-build-isolation --no-deps --no-index -e .; then
    record build ok "$LAST_DT" "pip install --no-build-isolation -e ."
  else
    record build "$STATUS" "$LAST_DT" "see gpu_check.log; later stages use whatever imports"
  fi
fi

if [ -n "$WARM_PID" ]; then
  s0=$(date +%s)
  wait "$WARM_PID"
  record triton-warm done $(( $(date +%s) - s0 )) "$(tail -1 "$OUT/triton_warm.log" 2>/dev/null)"
  cat "$OUT/triton_warm.log" >> "$LOG"; rm -f "$OUT/triton_warm.log"
fi

# ---- peers
s0=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  mkdir -p /tmp/site
  installed=()
  for w in .whl/*.whl; do  # one at a time: a wheel for another Python version must not block the rest
    if timeout 60 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$w" >> "$LOG" 2>&1; then
      installed+=("$(basename "$w" | cut -d- -f1-2)")
    else
      echo "peer wheel not installable here: $w" >> "$LOG"
    fi
  done
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  record peers ok $(( $(date +%s) - s0 )) "${installed[*]:-none installable}"
else
  record peers skipped 0 "no .whl/*.whl carried"
fi

# ---- argument checks of the CUDA ops, alone in a fresh process (an H200 run once died with SIGSEGV on the first
# bad-argument call inside the full test session): a crash here, first thing, points at the op or the
# environment; a pass here but a crash later points at state left by earlier tests. On a crash, gdb (when
# present) records the native backtrace in gpu_check.log.
if [ "$DRY_RUN" != "1" ] && [ -f tests/test_cuda.py ]; then
  # first the CPU ops' own argument checks (if they crash too, the fault is in this torch version's Python
  # autograd redispatch, not in the CUDA kernels), then the CUDA ops'; each in its own process
  for TEST in tests/test_cpu.py::test_cpu_direct_op_call_checks_arguments tests/test_cuda.py::test_argument_checks; do
    ARGCHECK=("$PY" -X faulthandler -m pytest -q -p no:cacheprovider "$TEST")
    run_stage argcheck "$(stage_timeout 60 300)" env LINATTN_ARGCHECK_CHILD=1 "${ARGCHECK[@]}"
    rc=$LAST_RC; st=$STATUS; dt=$LAST_DT; NOTE="$TEST alone in a fresh process"
    if [ $rc -ne 0 ] && [ $rc -ne 5 ] && [ $rc -ne 1 ] && command -v gdb >/dev/null 2>&1; then
      run_stage argcheck-gdb "$(stage_timeout 90 300)" env LINATTN_ARGCHECK_CHILD=1 gdb -q -batch -ex run -ex bt \
          -ex "info sharedlibrary" --args "${ARGCHECK[@]}"
      NOTE="$NOTE; crashed (rc $rc): gdb backtrace in gpu_check.log"
    fi
    record argcheck "$st" "$dt" "$NOTE"
  done
fi

# ---- gpu tests (the kernel test files: the other files have no GPU tests, and a missing optional dependency of
# theirs must not stop this stage)
if [ -d tests ]; then
  run_stage gpu-tests "$(stage_timeout 150 200)" "$PY" -m pytest -m gpu tests/test_triton.py tests/test_cuda.py tests/test_api.py \
      -q -rfE --maxfail=40 -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml"
  rc=$LAST_RC
  NOTE=$("$PY" - "$OUT/gpu_tests.xml" <<'PY' 2>/dev/null
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("no junit xml"); raise SystemExit
s = root if root.tag == "testsuite" else root.find("testsuite")
t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"{t - f - e - k} passed, {f} failed, {e} errors, {k} skipped")
PY
)
  [ $rc -eq 5 ] && STATUS="ok" && NOTE="no test selected by -m gpu"
  record gpu-tests "$STATUS" "$LAST_DT" "$NOTE"
else
  record gpu-tests skipped 0 "no tests/ folder"
fi

# ---- triton benchmark (written by the Triton engineer; called defensively)
if [ -f bench/triton_gpu_bench.py ]; then
  TDIR=$(mktemp -d /tmp/triton_bench.XXXXXX)
  if timeout 60 "$PY" bench/triton_gpu_bench.py --help 2>/dev/null | grep -q -- "--out"; then
    TARGS=(--out "$TDIR")
  else
    TARGS=("$TDIR")
  fi
  [ "$DRY_RUN" = "1" ] && timeout 30 "$PY" bench/triton_gpu_bench.py --help 2>/dev/null | grep -q -- "--dry-run" \
    && TARGS+=(--dry-run)
  # longest length first: the targets are at L = 8192 and 4096, and each row is logged as soon as it is timed
  [ "$DRY_RUN" = "1" ] || TARGS+=(--lengths 8192 4096 2048 1024)
  run_stage triton "$(stage_timeout 200 20)" "$PY" bench/triton_gpu_bench.py "${TARGS[@]}"
  mkdir -p "$OUT/triton"
  copied=0
  for f in $(ls -1 "$TDIR" 2>/dev/null | grep -E '\.(md|json|csv|txt)$' | head -3); do
    [ -f "$TDIR/$f" ] && cp "$TDIR/$f" "$OUT/triton/" && copied=$((copied + 1))
  done
  record triton "$STATUS" "$LAST_DT" "$copied file(s) to triton/"
else
  record triton skipped 0 "bench/triton_gpu_bench.py not present"
fi

# ---- compute-sanitizer over a handful of CUDA kernel calls (memcheck, then racecheck if time allows)
if [ "$DRY_RUN" != "1" ] && [ -f tests/cuda_sanitize.py ] && command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    run_stage "$tool" "$(stage_timeout 60 40)" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" tests/cuda_sanitize.py
    record "$tool" "$STATUS" "$LAST_DT" "compute-sanitizer --tool $tool python tests/cuda_sanitize.py"
  done
else
  record sanitizer skipped 0 "dry run, no tests/cuda_sanitize.py or no compute-sanitizer"
fi

# ---- scaling suite
T=$(stage_timeout 260 15)
if [ "$DRY_RUN" = "1" ]; then
  SARGS=(--device cpu --preset tiny --dtype float32 --name cuda_scaling --note "dry run on CPU (TRITON_INTERPRET=1)")
else
  SARGS=(--device cuda --name cuda_scaling --note "bench/gpu_check.sh")
fi
# GPU_CHECK_SCALING_ARGS: extra options for python -m bench.scaling, e.g. "--impls taylor_ --batch 1,16"
# shellcheck disable=SC2086
run_stage scaling "$T" "$PY" -m bench.scaling "${SARGS[@]}" --out "$OUT" --no-plots --total-budget $(( T > 60 ? T - 45 : 15 )) \
    ${GPU_CHECK_SCALING_ARGS:-}
NOTE=$("$PY" - "$OUT/cuda_scaling.json" <<'PY' 2>/dev/null
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    print("no results JSON"); raise SystemExit
t = [x for x in d.get("linattn_analysis", {}).get("targets", []) if x["verdict"] == "FAIL"]
n = sum(1 for b in d.get("benchmarks", []) if b.get("extra_info", {}).get("kind") != "peak")
print(f"{n} cases timed, {len(d.get('linattn_skipped', []))} skipped")
PY
)
record scaling "$STATUS" "$LAST_DT" "$NOTE"

# ---- summary
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Card: ${CARD:-unknown}  "
  echo "$VERSIONS"
  [ "$DRY_RUN" = "1" ] && echo && echo "**Dry run on CPU** (tiny sizes, TRITON_INTERPRET=1)."
  echo
  echo "| stage | status | seconds | note |"
  echo "|---|---|---|---|"
  for s in "${STAGES[@]}"; do IFS='|' read -r a b c d <<< "$s"; echo "| $a | $b | $c | $d |"; done
  echo
  echo "Total: $(( $(date +%s) - START )) s of a ${BUDGET} s budget. Files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
} > "$OUT/summary.md"
echo
echo "================ GPU check summary ================"
printf '%-10s %-10s %7s  %s\n' stage status seconds note
for s in "${STAGES[@]}"; do IFS='|' read -r a b c d <<< "$s"; printf '%-10s %-10s %7s  %s\n' "$a" "$b" "$c" "$d"; done
echo "total $(( $(date +%s) - START )) s; outputs in $OUT"
exit 0
