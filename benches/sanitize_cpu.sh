#!/usr/bin/env bash
# Memory safety of the C++ kernels (issue 21): build rlkern._C with AddressSanitizer and UBSan
# in a scratch copy of this checkout, run the C++ paths of the CPU test suite under them, one
# test file at a time, and write benches/results/cpu/sanitizers.md (with --fuzz, also the long
# fuzzing run of tests/test_fuzz_cpp.py into benches/results/cpu/fuzz-cpp.md).
#
#   bash benches/sanitize_cpu.sh [--fuzz] [--no-tests] [tests/test_X.py ...]
#
# Environment: RLKERN_SANITIZE_DIR (the scratch copy, default /tmp/rlkern-sanitize; kept, so a
# second run only recompiles the sources that changed), MAX_JOBS (default 1),
# RLKERN_FUZZ_EXAMPLES (examples per fuzz test in the long run, default 3000).
#
# The sanitizer runtimes are LD_PRELOADed into python (it is not built with them). Leaks are
# not checked (detect_leaks=0: CPython and torch keep allocations until exit on purpose). The
# Triton backend's parametrizations are deselected (-k "not triton"): they run no C++ and the
# interpreter is slow; everything else in the files runs, the C++ kernels included.
# --capture=sys: pytest's default fd capture would swallow a sanitizer report (written to fd 2)
# when the report ends the process.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${RLKERN_SANITIZE_DIR:-/tmp/rlkern-sanitize}
SAN=address,undefined
fuzz=0
tests_on=1
files=()
for a in "$@"; do
  case "$a" in
    --fuzz) fuzz=1 ;;
    --no-tests) tests_on=0 ;;
    *) files+=("$a") ;;
  esac
done
if [ ${#files[@]} -eq 0 ]; then
  files=(tests/test_fuzz_cpp.py tests/test_trees.py tests/test_advantages.py tests/test_logprobs.py
         tests/test_policy_loss.py tests/test_preference.py tests/test_preference_groups.py tests/test_preference_tokens.py
         tests/test_critics.py tests/test_shaping.py tests/test_dynamic_sampling.py tests/test_linear_logprobs.py
         tests/test_linear_losses.py tests/test_linear_preference.py tests/test_layout.py tests/test_fuzz.py)
fi
step() { echo "== $(date +%T) $*"; }

step "copy the checkout to $DIR"
mkdir -p "$DIR/logs"
# Tracked and untracked-but-not-ignored files, mtimes kept (ninja then rebuilds only what changed).
git ls-files -z -co --exclude-standard | xargs -0 cp -p --parents -t "$DIR" 2>/dev/null
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc setup.py || echo "+dirty")

step "build with -fsanitize=$SAN"
(cd "$DIR" && MAX_JOBS=${MAX_JOBS:-1} RLKERN_SANITIZE=$SAN python setup.py build_ext --inplace) \
  >"$DIR/logs/build.log" 2>&1 || { tail -30 "$DIR/logs/build.log"; exit 1; }
so=$(ls "$DIR"/rlkern/_C*.so)
ldd "$so" | grep -q libasan || { echo "$so is not linked against libasan"; exit 1; }

export PYTHONPATH="$DIR" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 \
  RLKERN_REQUIRE_PEERS=1 PYTHONUNBUFFERED=1
PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# halt_on_error: the first report ends the run (the test file then fails).
# allocator_may_return_null: an impossible allocation returns NULL as plain malloc does (torch
# then raises its out-of-memory error) instead of ASan aborting the process.
ASAN="detect_leaks=0,halt_on_error=1,allocator_may_return_null=1"
UBSAN="print_stacktrace=1,halt_on_error=1"
run_san() {  # run_san LOG ARGS...: python under the sanitizers, output to LOG; returns its exit code
  local log=$1; shift
  (cd "$DIR" && LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="$ASAN" UBSAN_OPTIONS="$UBSAN" "$@") >"$log" 2>&1
}
errors() { grep -c -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$@" | awk -F: '{s += $NF} END {print s + 0}'; }

# The instrumented module is the one under test (not an installed rlkern).
run_san "$DIR/logs/which.log" python -c "import rlkern, rlkern._C; print(rlkern._C.__file__)"
grep -q "^$DIR/rlkern/_C" "$DIR/logs/which.log" || { cat "$DIR/logs/which.log"; exit 1; }

machine="$(uname -srm), $(nproc --all) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
gccv=$(gcc --version | head -1)
torchv=$(python -c "import torch; print(torch.__version__)")
pyv=$(python -c "import platform; print(platform.python_version())")

if [ $tests_on -eq 1 ]; then
  rows=""
  total_pass=0; total_fail=0; total_err=0
  for f in "${files[@]}"; do
    name=$(basename "$f" .py)
    step "$f"
    t0=$(date +%s)
    run_san "$DIR/logs/$name.log" python -m pytest -q -p no:cacheprovider --capture=sys -k "not triton" "$f"
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    line=$(grep -E "^[0-9]+ (passed|failed)|^(FAILED|ERROR)|passed|failed|no tests ran" "$DIR/logs/$name.log" | tail -1)
    passed=$(echo "$line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+"); passed=${passed:-0}
    failed=$(echo "$line" | grep -oE "[0-9]+ failed" | grep -oE "[0-9]+"); failed=${failed:-0}
    skipped=$(echo "$line" | grep -oE "[0-9]+ skipped" | grep -oE "[0-9]+"); skipped=${skipped:-0}
    desel=$(echo "$line" | grep -oE "[0-9]+ deselected" | grep -oE "[0-9]+"); desel=${desel:-0}
    nerr=$(errors "$DIR/logs/$name.log")
    total_pass=$((total_pass + passed)); total_fail=$((total_fail + failed)); total_err=$((total_err + nerr))
    [ $rc -ne 0 ] && [ "$failed" = 0 ] && total_fail=$((total_fail + 1))  # a crash: no summary line
    echo "   rc=$rc passed=$passed failed=$failed skipped=$skipped sanitizer reports=$nerr (${dt}s)"
    rows+="| $f | $rc | $passed | $failed | $skipped | $desel | $nerr | $dt |"$'\n'
  done
  cat >"$ROOT/benches/results/cpu/sanitizers.md" <<EOF
# C++ kernels under AddressSanitizer + UBSan (CPU test suite)

Written by \`bash benches/sanitize_cpu.sh\` on $(date -u +%F).

- machine: $machine
- compiler: $gccv; Python $pyv; torch $torchv
- commit: $commit
- build: \`RLKERN_SANITIZE=$SAN python setup.py build_ext --inplace\` (adds
  \`-fsanitize=$SAN -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1\` to the C++
  extension's compile and link flags); the C++ tree kernels' scratch cache is off under ASan
  (every buffer an exact-size malloc, so over-reads of a reused buffer are caught)
- run: \`LD_PRELOAD=$PRELOAD ASAN_OPTIONS=$ASAN UBSAN_OPTIONS=$UBSAN
  OMP_NUM_THREADS=$OMP_NUM_THREADS python -m pytest -q --capture=sys -k "not triton" tests/<file>\`, one file at a time
  (\`-k "not triton"\`: the Triton-backend cases run no C++)

| test file | exit | passed | failed | skipped | deselected | ASan/UBSan reports | seconds |
|---|---|---|---|---|---|---|---|
${rows}
Total: $total_pass passed, $total_fail failed; **ASan/UBSan errors: $total_err**.
EOF
  step "summary: $total_pass passed, $total_fail failed, sanitizer reports $total_err"
  echo "   -> benches/results/cpu/sanitizers.md"
fi

if [ $fuzz -eq 1 ]; then
  step "long fuzz run (RLKERN_FUZZ=long, ${RLKERN_FUZZ_EXAMPLES:-3000} examples per test)"
  t0=$(date +%s)
  run_san "$DIR/logs/fuzz-long.log" env RLKERN_FUZZ=long python -m pytest -q -p no:cacheprovider --capture=sys \
    --hypothesis-show-statistics tests/test_fuzz_cpp.py
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  nerr=$(errors "$DIR/logs/fuzz-long.log")
  result=$(grep -E "passed|failed" "$DIR/logs/fuzz-long.log" | tail -1)
  stats=$(sed -n '/Hypothesis Statistics/,$p' "$DIR/logs/fuzz-long.log" | grep -vE "^=+ .*(passed|failed)" | sed 's/^/    /')
  cat >"$ROOT/benches/results/cpu/fuzz-cpp.md" <<EOF
# Long fuzzing run of the C++ string-uid hashing and tree validation (tests/test_fuzz_cpp.py)

Written by \`bash benches/sanitize_cpu.sh --fuzz\` on $(date -u +%F), under the same ASan/UBSan
build as benches/results/cpu/sanitizers.md.

- machine: $machine
- compiler: $gccv; Python $pyv; torch $torchv
- commit: $commit
- run: \`RLKERN_FUZZ=long RLKERN_FUZZ_EXAMPLES=${RLKERN_FUZZ_EXAMPLES:-3000} python -m pytest
  --hypothesis-show-statistics tests/test_fuzz_cpp.py\` (random seeds, not derandomized), ${dt} s, exit $rc
- result: $result; **ASan/UBSan errors: $nerr**

Hypothesis statistics (examples run per test, and the classes of parent arrays drawn):

$stats
EOF
  step "fuzz: $result, sanitizer reports $nerr (${dt}s) -> benches/results/cpu/fuzz-cpp.md"
fi
