#!/usr/bin/env bash
# The GPU check, at most 8 minutes on one CUDA GPU:
#   bf16    a short `python -m wgan_lit.train trainer=gpu trainer.precision=bf16-mixed` run writes last.ckpt;
#   resume  12 generator steps straight, and 5 (stopped mid-epoch) resumed to 12, give last.ckpt files whose
#           every tensor is equal (trainer.deterministic=true);
#   rng     the training callback's scoring leaves torch.random's and torch.cuda's RNG states unchanged;
#   speed   generator it/s at 3 x 64 x 64, the project against a plain PyTorch loop (benchmarks/throughput.py).
# The data is generated (PNGs for data=folder, Fashion-MNIST-shaped IDX files for the benchmark): nothing is
# downloaded.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]        # default: $OUT, else ./gpu_check_out
#
# Writes OUTPUT_FOLDER/summary.txt (one line per check, also printed) and log.txt (every command's output); the
# working files in OUTPUT_FOLDER/work are removed at the end. Exit 0 when every check passed or there is no CUDA
# GPU (it says so), 1 when a check failed, 2 for a wrong argument.
# PYTHON (default python3) runs everything. Where it has torch, the project's other missing requirements are
# pip-installed into it, with no index from the wheels in GPU_CHECK_WHEELS (default <repo>/.whl) when that
# folder exists; where it has no torch but the machine has a GPU, a venv in the work folder gets `pip install -e`.
# GPU_CHECK_DEVICE=cpu: the same steps on the CPU with tiny networks, a dry run of the script.
set -uo pipefail

if [ $# -gt 1 ] || [[ "${1:-}" == -* ]]; then
  echo "Error: gpu_check.sh takes one optional argument, the output folder; got: $*" >&2
  exit 2
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then
  echo "Error: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'; unset it for the GPU check" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
HELPER=$REPO/benchmarks/gpu_check.py
OUTDIR=${1:-${OUT:-gpu_check_out}}
if ! mkdir -p "$OUTDIR" 2>/dev/null || [ ! -w "$OUTDIR" ]; then
  echo "Error: cannot write to the output folder '$OUTDIR'; give a writable folder as the first argument" >&2
  exit 2
fi
OUTDIR=$(cd "$OUTDIR" && pwd)
SUMMARY=$OUTDIR/summary.txt
LOG=$OUTDIR/log.txt
WORK=$OUTDIR/work
PY=${PYTHON:-python3}
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# At once without CUDA: torch's answer where the interpreter has torch, else nvidia-smi's.
probe=$(timeout 120 "$PY" -c "import torch; print(torch.cuda.is_available(), torch.__version__)" 2>/dev/null)
if [ "$DEVICE" = cuda ]; then
  if [ -n "$probe" ] && [ "${probe%% *}" != True ]; then
    say "gpu_check: skipped, no CUDA GPU: torch ${probe#* } in $PY finds none"
    exit 0
  elif [ -z "$probe" ] && ! nvidia-smi -L >/dev/null 2>&1; then
    say "gpu_check: skipped, no CUDA GPU: nvidia-smi finds none and $PY has no torch"
    exit 0
  fi
fi

rm -rf "$WORK"
mkdir -p "$WORK"
: >"$LOG"
trap 'rm -rf "$WORK"' EXIT
DEADLINE=470 # seconds since the start (bash's SECONDS): 8 minutes, less the margin of timeout's kill
PASSED=0
FAILED=0
STEP_OUT=$WORK/step.out

# step LIMIT COMMAND...: COMMAND under timeout (LIMIT seconds, or what is left of the 8 minutes), its output into
# log.txt. On failure REASON says why, with the last line it printed.
step() {
  local limit=$1 left=$((DEADLINE - SECONDS)) rc
  shift
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    REASON="not run: the 8 minutes are spent"
    return 1
  fi
  echo "=== $(date +%T) (limit ${limit} s): $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" >"$STEP_OUT" 2>&1
  rc=$?
  cat "$STEP_OUT" >>"$LOG"
  if ((rc == 124 || rc == 137)); then
    REASON="timed out after ${limit} s: $*"
  elif ((rc != 0)); then
    REASON="exit $rc: $(result || grep -v '^\s*$' "$STEP_OUT" | tail -n 1)"
  fi
  return $rc
}
result() { grep '^RESULT: ' "$STEP_OUT" | tail -n 1 | cut -c9- | grep .; }
report() { # report RC NAME DETAIL: PASS when the check's steps succeeded (RC 0), else FAIL and why; returns RC
  if (($1 == 0)); then
    PASSED=$((PASSED + 1))
    say "$(printf 'PASS  %-7s %s' "$2" "$3")"
  else
    FAILED=$((FAILED + 1))
    say "$(printf 'FAIL  %-7s %s' "$2" "$REASON")"
  fi
  return "$1"
}
finish() {
  say "gpu_check: $PASSED passed, $FAILED failed in $SECONDS s; log in $LOG"
  exit $((FAILED > 0))
}

# ---- install: the interpreter's own torch, the project from this checkout ------------------------------------
if [ -z "$probe" ]; then # a GPU but no torch: a venv with everything from the package index
  step 300 bash -c '"$1" -m venv "$2/venv" && "$2/venv/bin/pip" install -q -e "$3"' _ "$PY" "$WORK" "$REPO"
  report $? install "a venv with pip install -e $REPO" || finish
  PY=$WORK/venv/bin/python
else
  mapfile -t reqs < <("$PY" "$HELPER" missing)
  if ((${#reqs[@]})); then
    WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
    src=()
    [ -d "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
    step 180 "$PY" -m pip install -q "${src[@]}" "${reqs[@]}"
    report $? install "${reqs[*]} into $PY${src:+ from $WHEELS}" || finish
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step 60 "$PY" -c "import sys, torch, lightning; print('RESULT:', torch.cuda.get_device_name() if sys.argv[1] == 'cuda' \
else 'cpu', '| torch', torch.__version__, '| lightning', lightning.__version__)" "$DEVICE" &&
  say "gpu_check: $(result) | $PY" || { report 1 env; finish; }
step 120 "$PY" "$HELPER" data "$WORK" || { report 1 data; finish; }
cd "$WORK" || exit 1 # throughput.py reads its IDX files from ./data

if [ "$DEVICE" = cuda ]; then
  TRAINER=gpu SMALL=() BF16_STEPS=40 BENCH=(--iters 20)
  VARIANTS=(lightning "lightning bf16-mixed" "lightning device_resident")
else # the dry run: tiny networks, the benchmark's smoke test
  TRAINER=cpu SMALL=(model.g_features=8 model.d_features=8 model.latent_dim=16 data.batch_size=16) BF16_STEPS=4
  BENCH=(--quick --features 8 --latent-dim 16 --batch-size 16) VARIANTS=(lightning "lightning bf16-mixed")
fi
# max_epochs=-1: max_gen_steps alone ends each run (the default 5 epochs are 8 generator steps on the GPU here)
TRAIN=("$PY" -m wgan_lit.train "trainer=$TRAINER" data=folder "data.root=$WORK/images" trainer.max_epochs=-1
  trainer.enable_progress_bar=false logger.sample_every_n_gen_steps=0 logger.timelapse=false "${SMALL[@]}")

# ---- bf16: a real run of the command ----------------------------------------------------------------------------
step 180 "${TRAIN[@]}" trainer.precision=bf16-mixed "max_gen_steps=$BF16_STEPS" "hydra.run.dir=$WORK/bf16" &&
  ran_on=$(sed -n 's/^ *device  *//p' "$STEP_OUT" | head -n 1) && # the run's start-up summary: device, precision
  step 60 "$PY" "$HELPER" ckpt "$WORK/bf16/checkpoints/last.ckpt" "$BF16_STEPS"
report $? bf16 "trainer=$TRAINER trainer.precision=bf16-mixed on $ran_on: $(result)"

# ---- resume: 512 images, 8 batches of 64 per epoch (32 of 16 on the CPU), n_critic 5 -----------------------------
# 5 generator steps = 25 batches: a stop inside an epoch.
DET=(env CUBLAS_WORKSPACE_CONFIG=:4096:8 "${TRAIN[@]}" trainer.deterministic=true) # cuBLAS's deterministic mode
LAST=$WORK/resumed/checkpoints/last.ckpt
step 150 "${DET[@]}" max_gen_steps=12 "hydra.run.dir=$WORK/straight" &&
  step 150 "${DET[@]}" max_gen_steps=5 "hydra.run.dir=$WORK/resumed" &&
  step 60 "$PY" "$HELPER" ckpt "$LAST" 5 && stopped=$(result) &&
  step 150 "${DET[@]}" max_gen_steps=12 "ckpt_path=$LAST" "hydra.run.dir=$WORK/resumed" &&
  step 60 "$PY" "$HELPER" compare "$WORK/straight/checkpoints/last.ckpt" "$LAST"
report $? resume "stopped at ${stopped:-?}; resumed to 12: $(result)"

# ---- rng: the metrics' scoring ----------------------------------------------------------------------------------
step 120 "$PY" "$HELPER" rng --device "$DEVICE"
report $? rng "$(result)"

# ---- speed: generator it/s, the project's training against the plain loop, in one process ------------------------
step 300 "$PY" "$REPO/benchmarks/throughput.py" --device "$DEVICE" --image-size 64 --channels 3 "${BENCH[@]}" \
  --variants "${VARIANTS[@]}"
rc=$?
rates=$(sed -n 's/^rate\[\(.*\)\]: \([0-9.]*\) gen_iter\/s  ratio_vs_plain: \([0-9.]*\).*/\1 \2 (\3x)/p' "$STEP_OUT" |
  paste -sd ';' | sed 's/;/; /g')
workload=$(sed -n 's/^workload: \([^;]*\);.*/\1/p' "$STEP_OUT")
report $rc speed "gen it/s, $workload: $rates"
finish
