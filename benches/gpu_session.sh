#!/usr/bin/env bash
# Issue 8's device call, prepared ahead (it has not run on a GPU yet): build rlkern against the
# machine's torch, run the GPU tests, the compute-sanitizer passes and the benchmarks, and leave
# everything in $OUT as one log and one tarball (the device tool returns at most 8 files).
#
#   bash benches/gpu_session.sh [build] [tests] [sanitize] [bench]     (default: all four)
#
# Each stage is timed in the log; pick stages so that one call ends well inside 10 minutes.
# Peers missing on the GPU image travel as Python 3.12 wheels in .whl/ (see the device README:
# pip download --no-deps --only-binary=:all: --python-version 3.12 ... trl==1.16.* verl==0.9.1
# liger-kernel==0.8.5 cut-cross-entropy and their missing needs), named in the call's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlkern-gpu}
res="$OUT/results"
mkdir -p "$res"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitize bench)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
step() { echo "== $(date +%T) $*"; }
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

if want build; then
  step build
  MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$res/build.log" 2>&1 \
    || { tail -40 "$res/build.log"; exit 1; }
fi
python3 -m rlkern.cli info | tee "$res/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >>"$res/info.txt" 2>&1

if want tests; then
  step "gpu tests"
  # -m gpu: the CUDA-only tests; the Triton linear-log-prob file runs on CUDA tensors as a whole.
  python3 -m pytest -q -m gpu tests >"$res/tests_gpu.log" 2>&1 || status=1
  python3 -m pytest -q tests/test_linear_logprobs_triton.py >>"$res/tests_gpu.log" 2>&1 || status=1
  tail -3 "$res/tests_gpu.log"
fi

if want sanitize; then
  # Small and tail-heavy shapes: the CUDA-marked tests of each family, under each tool.
  for tool in memcheck racecheck initcheck; do
    step "compute-sanitizer $tool"
    compute-sanitizer --tool "$tool" --target-processes all --print-limit 20 \
      python3 -m pytest -q -x -m gpu tests/test_trees.py tests/test_advantages.py tests/test_policy_loss.py \
        tests/test_logprobs.py tests/test_preference.py tests/test_preference_tokens.py \
        tests/test_preference_groups.py tests/test_critics.py tests/test_shaping.py tests/test_dynamic_sampling.py \
        tests/test_rewards.py tests/test_linear_losses.py tests/test_linear_preference.py tests/test_lm_heads.py \
        -k "not long_rows" \
      >"$res/sanitizer_$tool.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|passed|failed" "$res/sanitizer_$tool.log" | tail -3
  done
fi

if want bench; then
  dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
  day=$(date +%F)
  # every family of `rlkern bench` (benches/suite.py FAMILIES)
  for family in $(python3 -c "from rlkern.benches import suite; print(' '.join(suite.FAMILIES))"); do
    step "bench $family"
    python3 -m "rlkern.benches.bench_$family" --out "$res/${dev}_${day}_$family" >"$res/bench_$family.log" 2>&1 \
      || status=1
    tail -12 "$res/bench_$family.log"
  done
fi

tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$res"
step "done (status $status); unpack with: tar xzf results.tgz"
exit $status
