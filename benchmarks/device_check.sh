#!/usr/bin/env bash
# One-shot check of flashode on a lent GPU machine (H100/H200; no internet).
#
#   bash benchmarks/device_check.sh          # from the repository root
#
# Steps, each under `timeout`, all within a global deadline (DEADLINE_S, default 340 s, so the
# whole script stays under 6 minutes):
#   1. pip install --no-build-isolation .   (CUDA kernels for this GPU's arch only; log to a file)
#   2. flashode.show_config(), and fail unless the CUDA kernels loaded
#   3. the CUDA tests: pytest -x -k cuda (markers count as keywords; "no tests matched" is not a failure)
#   4. python benchmarks/kernels.py --device cuda
#   5. python benchmarks/overhead.py --device cuda --grad
#   6. python benchmarks/adjoint.py --device cuda (odeint_adjoint fwd+bwd vs torchdiffeq)
#   7. python benchmarks/parity.py --device cuda --quick (events, Adams, rk4, dense output vs torchdiffeq)
#   8. python benchmarks/batch.py --device cuda --quick (solve_ivp per-sample steps vs torchode/torchdiffeq)
#   9. python -m flashode demo --device cuda (NeuralODE training: kernels vs reference path vs torchdiffeq)
#  10. python benchmarks/fused_mlp.py --device cuda (the fused whole-solve MLP op vs the generic path,
#      torchdiffeq and torchode at B = 4096 and 1e6; run right after the CUDA tests, before the
#      older benchmarks, so the deadline cannot skip it)
# then a summary table. Every step's output goes to $OUT (when set; the device tool returns files
# written there) or to a temporary folder. Exit status: 0 when no step failed.
#
# Knobs (environment): DEVICE (default cuda), DEADLINE_S, SKIP_INSTALL=1 (use the flashode already
# importable), CUDA_ARCH (default: detected from torch, e.g. 90), QUICK=1 (benchmarks' --quick),
# BUILD_DIR (scikit-build-core build folder; default build/<wheel tag>, reused by a rerun).
set -euo pipefail

DEVICE="${DEVICE:-cuda}"
DEADLINE_S="${DEADLINE_S:-340}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
QUICK_FLAG=()
[[ "${QUICK:-0}" == 1 ]] && QUICK_FLAG=(--quick)
LOG_DIR="${OUT:-$(mktemp -d /tmp/flashode-device-check.XXXXXX)}"
mkdir -p "$LOG_DIR"
SUMMARY="$LOG_DIR/summary.md"
START=$(date +%s)
DEADLINE=$((START + DEADLINE_S))
FAILED=0
ROWS=()

cd "$(dirname "$0")/.."

# Records one summary row: step, status, seconds.
record() {
  ROWS+=("| $1 | $2 | $3 |")
  if [[ "$2" == FAIL* || "$2" == timeout* ]]; then FAILED=1; fi
}

# Seconds a step may take: its own budget, capped by what is left before the deadline (5 s spare).
step_timeout() {
  local budget=$1 left=$((DEADLINE - $(date +%s) - 5))
  echo $((budget < left ? budget : left))
}

# run_step NAME BUDGET_S [--ok-codes "0 5"] CMD...: runs CMD under timeout, tees its output to
# $LOG_DIR/NAME.log and records the outcome. Returns 0 if the step passed.
run_step() {
  local name=$1 budget=$2 ok_codes="0"
  shift 2
  if [[ "${1:-}" == "--ok-codes" ]]; then ok_codes=$2; shift 2; fi
  local t
  t=$(step_timeout "$budget")
  if ((t < 10)); then
    record "$name" "skipped (deadline)" 0
    return 1
  fi
  echo
  echo "=== $name (timeout ${t}s) ==="
  local begin rc
  begin=$(date +%s)
  set +e
  timeout --kill-after=5 "$t" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$(($(date +%s) - begin))
  if [[ " $ok_codes " == *" $rc "* ]]; then
    local status="ok"
    [[ $rc -ne 0 ]] && status="ok (exit $rc)"
    record "$name" "$status" "$took"
    return 0
  elif ((rc == 124 || rc == 137)); then
    record "$name" "timeout after ${t}s" "$took"
  else
    record "$name" "FAIL (exit $rc)" "$took"
  fi
  return 1
}

# pip install with the full log in a file; its tail is printed only on failure.
install_flashode() {
  local arch=$1 log="$LOG_DIR/pip_install.log"
  local args=(--no-build-isolation --no-deps --no-index -v .)
  [[ -n "$arch" ]] && args+=(--config-settings="cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch")
  [[ -n "${BUILD_DIR:-}" ]] && args+=(--config-settings="build-dir=$BUILD_DIR")
  echo "pip install ${args[*]}  (log: $log)"
  if python -m pip install "${args[@]}" >"$log" 2>&1; then
    grep -E "flashode: building|Successfully installed" "$log" || true
  else
    local rc=$?
    echo "--- pip install failed (exit $rc); last 60 lines of $log:"
    tail -n 60 "$log"
    return "$rc"
  fi
}

detect_arch() {
  [[ -n "${CUDA_ARCH:-}" ]] && { echo "$CUDA_ARCH"; return; }
  python - <<'EOF' 2>/dev/null || true
import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}{minor}")
EOF
}

echo "flashode device check: $(date -u), logs in $LOG_DIR"
if [[ "$DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null || true
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi
fi
python -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.is_available())"
export -f install_flashode

# 1. install
INSTALLED=1
if [[ "$SKIP_INSTALL" == 1 ]]; then
  record "pip install" "skipped (SKIP_INSTALL=1)" 0
else
  ARCH="$(detect_arch)"
  export LOG_DIR BUILD_DIR="${BUILD_DIR:-}"
  run_step pip_install 200 bash -c "install_flashode '$ARCH'" || INSTALLED=0
fi

# 2-5. checks and benchmarks (pointless without an install)
if ((INSTALLED)); then
  run_step show_config 30 python -c "
import sys, flashode
from flashode import _ops
flashode.show_config()
if '$DEVICE' == 'cuda' and 'cuda' not in _ops.kernel_devices:
    sys.exit('CUDA kernels not loaded: ' + _ops.load_errors.get('cuda', '?'))
" || true
  # exit 5 = no tests collected (e.g. none match): not a failure
  run_step pytest_cuda 120 --ok-codes "0 5" python -m pytest -q -x -p no:cacheprovider tests -k cuda || true
  run_step fused_mlp 80 python benchmarks/fused_mlp.py --device "$DEVICE" --batch 4096 1000000 --repeats 3 \
    --libraries flashode-fused flashode-generic torchdiffeq torchode || true
  run_step kernels 90 python benchmarks/kernels.py --device "$DEVICE" --budget 0.5 "${QUICK_FLAG[@]}" || true
  run_step overhead 90 python benchmarks/overhead.py --device "$DEVICE" --grad "${QUICK_FLAG[@]}" || true
  run_step adjoint 90 python benchmarks/adjoint.py --device "$DEVICE" "${QUICK_FLAG[@]}" || true
  run_step parity 60 python benchmarks/parity.py --device "$DEVICE" --quick || true
  run_step batch 60 python benchmarks/batch.py --device "$DEVICE" --quick || true
  run_step demo 60 python -m flashode demo --device "$DEVICE" --iters 300 --compare-iters 30 --out "$LOG_DIR/demo.png" || true
else
  for step in show_config pytest_cuda fused_mlp kernels overhead adjoint parity batch demo; do record "$step" "skipped (install failed)" 0; done
fi

# summary
{
  echo "## flashode device check ($(date -u +%Y-%m-%dT%H:%MZ), device $DEVICE, total $(($(date +%s) - START)) s)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${ROWS[@]}"
} >"$SUMMARY"
for step in fused_mlp kernels overhead adjoint parity batch; do
  if [[ -s "$LOG_DIR/$step.log" ]]; then
    { echo; echo "### $step tables"; echo; sed -n '/^|/p;/^Note:/p' "$LOG_DIR/$step.log"; } >>"$SUMMARY"
  fi
done
if [[ -s "$LOG_DIR/demo.log" ]]; then
  { echo; echo "### demo"; echo; grep -E "ms/it|whole-trajectory|NFE per" "$LOG_DIR/demo.log" | sed 's/^/    /'; } >>"$SUMMARY"
fi
echo
cat "$SUMMARY"
exit "$FAILED"
