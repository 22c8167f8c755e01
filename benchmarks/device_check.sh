#!/usr/bin/env bash
# The one GPU check: build the extension for sm_90, run the CUDA tests, run the
# benchmarks; logs and JSON under $OUT. Run from the repository root, e.g. with
# the device tool:  bash benchmarks/device_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/nrrdd_device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

note "date: $(date -u +%Y-%m-%dT%H:%MZ)"
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1)"
note "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"

start=$(date +%s)
# An in-place build (the device image's pip would try to fetch setuptools for an
# isolated editable build, and that machine is offline).
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  note "build: FAILED"
  exit 1
fi
note "build: ok in $(( $(date +%s) - start )) s; cuda kernels: $($PY -c 'import nrrdd_ext; print(nrrdd_ext.cuda_kernels_built())')"

# CUDA tests (the ops' and the driver's), then a CPU sanity subset.
$PY -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log" | tail -n 25
note "tests (cuda): $(tail -n 1 "$OUT/tests_cuda.log")"

# Stages: ops, refine (benchmarks), teachers (real Fashion-MNIST teachers on the GPU;
# needs the IDX files under $NRRDD_DATA, default data/fashion-mnist, carried along).
STAGE="${NRRDD_DEVICE_STAGES:-ops refine}"
if [[ " $STAGE " == *" ops "* ]]; then
  $PY benchmarks/bench_ops.py --device cuda --iters 50 --json "$OUT/bench_ops.json" 2>&1
fi
if [[ " $STAGE " == *" refine "* ]]; then
  $PY benchmarks/bench_refine.py --device cuda --iters 30 --json "$OUT/bench_refine.json" 2>&1
  # where the time goes in the eager fused step (the breakdown the targets ask for)
  $PY benchmarks/bench_refine.py --device cuda --iters 10 --config resnet18-224 --config resnet18-32 \
    --mode fused --mode floor --profile "$OUT/profile.txt" >/dev/null 2>&1 || true
fi
if [[ " $STAGE " == *" teachers "* ]]; then
  data="${NRRDD_DATA:-data/fashion-mnist}"
  for spec in ${NRRDD_TEACHERS:-convnet3:12 resnet18:10}; do
    arch=${spec%%:*} epochs=${spec##*:}
    t0=$(date +%s)
    $PY -m nrrdd train-teacher --dataset fashion-mnist --data-dir "$data" --arch "$arch" \
      --epochs "$epochs" --out "/tmp/teacher_$arch.pt" --device cuda --force 2>&1 | grep -v Warning \
      | tee -a "$OUT/teachers.log" | tail -n 3
    note "teacher $arch, $epochs epochs: $(grep -o 'test accuracy [0-9.]*' "$OUT/teachers.log" | tail -n 1), $(( $(date +%s) - t0 )) s"
  done
  cp /tmp/teacher_convnet3.pt "$OUT/" 2>/dev/null || true
fi
note "total: $(( $(date +%s) - start )) s"
