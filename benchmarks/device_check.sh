#!/usr/bin/env bash
# The one GPU check: build the extension for sm_90, run the CUDA tests, run the
# benchmarks; logs and JSON under $OUT. Run from the repository root, e.g. with
# the device tool:  bash benchmarks/device_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/nrrdd_device_out}"
# NRRDD_WORK: scratch space for teachers, runs and builds (default /tmp, the device
# machine's; give a folder of your own elsewhere, so nothing there is overwritten)
W="${NRRDD_WORK:-/tmp}"
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
# NRRDD_REHEARSAL=1: the driver stages only, on the CPU, at toy sizes, with the
# extension already built: a check of this script's logic that costs no GPU time.
DEV=cuda EPOCHS=300 MIPC=300 ITERS="${NRRDD_ITERS:-2000}"
if [[ "${NRRDD_REHEARSAL:-0}" == 1 ]]; then
  DEV=cpu EPOCHS=1 MIPC=40 ITERS=2
fi
# On the GPU: an in-place build (the device image's pip would try to fetch setuptools
# for an isolated editable build, and that machine is offline), first on the path. In a
# rehearsal: the installed nrrdd_ext, with -P so that the checkout's uncompiled
# nrrdd_ext/ folder cannot shadow it (a plain `pip install .` leaves no _C there).
if [[ $DEV == cuda ]]; then
  export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
else
  PY="$PY -P"
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
STAGE="${NRRDD_DEVICE_STAGES:-ops refine}"
# Stage `patch`: the kernel changes waiting for a GPU (benchmarks/pending/*.patch, or
# NRRDD_PATCHES) applied to a copy of the tree, built beside the main build (8 jobs
# each), then its op CUDA tests and bench_ops, to compare with the main build's.
patched="$W/nrrdd_patched"
if [[ " $STAGE " == *" patch "* && $DEV == cuda ]]; then
  rm -rf "$patched" && mkdir -p "$patched"
  tar cf - --exclude=./build --exclude='*.so' --exclude=./data --exclude=./.git . | tar xf - -C "$patched"
  (cd "$patched" && for f in ${NRRDD_PATCHES:-benchmarks/pending/*.patch}; do
     echo "applying $f"; patch -p1 <"$f" || git apply "$f" || exit 1; done >"$OUT/patch_build.log" 2>&1 \
    && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 $PY setup.py build_ext --inplace >>"$OUT/patch_build.log" 2>&1) &
  patch_build=$!
  jobs_main=8
fi
if [[ $DEV == cuda ]]; then
  if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${jobs_main:-16} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    note "build: FAILED"
    exit 1
  fi
  note "build: ok in $(( $(date +%s) - start )) s; cuda kernels: $($PY -c 'import nrrdd_ext; print(nrrdd_ext.cuda_kernels_built())')"

  # CUDA tests (the ops' and the driver's); NRRDD_SKIP_TESTS=1 for a second call on a warm machine
  if [[ "${NRRDD_SKIP_TESTS:-0}" != 1 ]]; then
    # shellcheck disable=SC2086
    $PY -m pytest ${NRRDD_TEST_ARGS:-tests} -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log" | tail -n 25
    note "tests (cuda): $(tail -n 1 "$OUT/tests_cuda.log")"
  fi
fi

# Stages: ops, refine (benchmarks), teachers (real Fashion-MNIST teachers on the GPU;
# needs the IDX files under $NRRDD_DATA, default data/fashion-mnist, carried along),
# fastcheck (issue 8: student top-1 from `--fast` against `--no-fast`, needs teachers),
# study (issue 7: benchmarks/fashion_mnist_study.py with the ConvNet-3 teacher, needs
# teachers; NRRDD_STUDY_ARGS adds its flags, e.g. "--ipc 10 --seeds 3").
# patch (above). What does not fit the 8 files that come back goes into
# $OUT/extras.tar.gz, packed again after every stage so that a timeout loses nothing.
data="${NRRDD_DATA:-data/fashion-mnist}"
if [[ $DEV == cpu ]]; then  # rehearsal: 50 training and 10 test images per class of the real data
  PYTHONPATH="$PWD/python" $PY - "$data" "$W/fm_rehearsal" <<'PYEOF'
import gzip, struct, sys
from pathlib import Path
import numpy as np
from nrrdd.data import read_idx
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for split, per in (("train", 50), ("t10k", 10)):
    find = lambda kind: next(src.glob(f"{split}-{kind}-idx*-ubyte*"))
    x, y = read_idx(find("images")), read_idx(find("labels"))
    keep = np.concatenate([np.nonzero(y == c)[0][:per] for c in range(10)])
    for kind, a in (("images", x[keep]), ("labels", y[keep])):
        with gzip.open(dst / f"{split}-{kind}-idx{a.ndim}-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.astype(np.uint8).tobytes())
PYEOF
  data="$W/fm_rehearsal"
fi
extras="$OUT/extras"
mkdir -p "$extras"
pack() { tar czf "$OUT/extras.tar.gz.tmp" -C "$OUT" extras && mv "$OUT/extras.tar.gz.tmp" "$OUT/extras.tar.gz"; }
if [[ " $STAGE " == *" ops "* && $DEV == cuda ]]; then
  $PY benchmarks/bench_ops.py --device cuda --iters 50 --json "$OUT/bench_ops.json" 2>&1
  # the kernels of each fused op (the masked step is a CAM kernel and the step kernel)
  $PY benchmarks/bench_ops.py --device cuda --iters 5 --profile "$OUT/profile.txt" >/dev/null 2>&1 || true
fi
if [[ " $STAGE " == *" refine "* && $DEV == cuda ]]; then
  $PY benchmarks/bench_refine.py --device cuda --iters 30 --json "$OUT/bench_refine.json" 2>&1
  # where the time goes in the eager fused step (the breakdown the targets ask for)
  $PY benchmarks/bench_refine.py --device cuda --iters 10 --config resnet18-224 --config resnet18-32 \
    --mode fused --mode floor --profile "$OUT/profile.txt" >/dev/null 2>&1 || true
  # student training per layout and precision (evaluate --channels-last / --bf16; seconds)
  $PY benchmarks/bench_student.py --device cuda --config convnet3-28 --config resnet18-32 --ipc 50 \
    --epochs 5 --json "$extras/bench_student.json" 2>&1 | tee "$extras/bench_student.txt"
  pack
fi
if [[ " $STAGE " == *" patch "* && $DEV == cuda ]]; then
  t0=$(date +%s)
  if wait "$patch_build"; then
    (cd "$patched" && PYTHONPATH="$patched:$patched/python" $PY -m pytest tests -q -m cuda --ignore=tests/driver \
      -p no:cacheprovider >"$extras/patch_tests_cuda.log" 2>&1)
    note "patched tests (cuda): $(tail -n 1 "$extras/patch_tests_cuda.log")"
    (cd "$patched" && PYTHONPATH="$patched:$patched/python" $PY benchmarks/bench_ops.py --device cuda --iters 50 \
      --json "$extras/bench_ops_patched.json" >"$extras/bench_ops_patched.txt" 2>&1)
    cat "$extras/bench_ops_patched.txt"
  else
    tail -n 30 "$OUT/patch_build.log"
    note "patched build: FAILED"
  fi
  note "patch stage: $(( $(date +%s) - t0 )) s after the main stages"
  pack
fi
if [[ " $STAGE " == *" teachers "* ]]; then
  # arch:epochs:augment[:bf16] (the CPU recipes: ConvNet-3 flip 8 epochs 92.24%, ResNet-18
  # standard 15 epochs bf16 + channels_last 94.40%; see RESULTS.md)
  for spec in ${NRRDD_TEACHERS:-convnet3:12:flip resnet18:15:standard:bf16}; do
    IFS=: read -r arch epochs augment precision <<<"$spec"
    t0=$(date +%s)
    $PY -m nrrdd train-teacher --dataset fashion-mnist --data-dir "$data" --arch "$arch" \
      ${precision:+--bf16 --channels-last} \
      --epochs "$([[ $DEV == cuda ]] && echo "$epochs" || echo 1)" --augment "${augment:-standard}" \
      --out "$W/teacher_$arch.pt" --device "$DEV" --force 2>&1 | grep -v Warning \
      | tee -a "$extras/teachers.log" | tail -n 3
    note "teacher $arch ($epochs epochs asked): $(grep -o 'test accuracy [0-9.]*' "$extras/teachers.log" | tail -n 1), $(( $(date +%s) - t0 )) s"
  done
  cp "$W/teacher_convnet3.pt" "$extras/" 2>/dev/null || true
  pack
fi
# NRRDD_TEACHER_DIR: where teacher_<arch>.pt are (default $W, where `teachers` writes;
# carried ones, e.g. data/teachers, spare a call the training). NRRDD_FAST_PARALLEL=1
# runs the four fastcheck runs at once (wall times then shared: accuracy only).
tdir="${NRRDD_TEACHER_DIR:-$W}"
fastcheck_one() {  # arch path distillation-seed
  local arch=$1 path=$2 seed=$3 t0 tag run
  tag="$arch-$path$([[ $seed != 0 ]] && echo "-seed$seed")"
  run="$W/fastcheck/$tag"
  t0=$(date +%s)
  $PY -m nrrdd run --dataset fashion-mnist --data-dir "$data" --teacher "$tdir/teacher_$arch.pt" \
    --method nrr --ipc 10 --labels soft --seeds 3 --iterations "$ITERS" --epochs "$EPOCHS" \
    --mipc "$MIPC" --device "$DEV" "--$path" --seed "$seed" --out "$run" --force --quiet \
    >"$extras/fastcheck_$tag.log" 2>&1
  mkdir -p "$extras/fastcheck/$tag"
  cp "$run/run.json" "$run/distilled/log.jsonl" "$run/distilled/timings.json" "$extras/fastcheck/$tag/" 2>/dev/null
  note "fastcheck $arch --$path seed $seed: $($PY -c "import json; d=json.load(open('$run/run.json')); print(d['top1']['soft'], 'mean', round(d['top1_mean']['soft'], 2), 'distill s', round(d['seconds']['distill'], 1), 'peak GiB', d.get('gpu_peak_GiB'))" 2>&1 | tail -n 1), $(( $(date +%s) - t0 )) s"
}
if [[ " $STAGE " == *" fastcheck "* ]]; then
  # NRRDD_FAST_SEEDS: distillation seeds per arch and path (default "0"; "0 1 2" pools
  # 9 students per path, what the ResNet-18 check needs: its students spread ~2 points)
  archs=${NRRDD_FAST_ARCHS:-convnet3 resnet18}
  for arch in $archs; do
    for path in fast no-fast; do
      for seed in ${NRRDD_FAST_SEEDS:-0}; do
        if [[ "${NRRDD_FAST_PARALLEL:-0}" == 1 ]]; then fastcheck_one "$arch" "$path" "$seed" &
        else fastcheck_one "$arch" "$path" "$seed"; fi
      done
    done
  done
  wait
  for arch in $archs; do
    $PY benchmarks/plot_loss_curves.py "$W/fastcheck/$arch-fast/distilled" "$W/fastcheck/$arch-no-fast/distilled" \
      --label "$arch --fast" --label "$arch --no-fast" --out "$extras/fastcheck/curves_$arch.png" >>"$summary" 2>&1
  done
  pack
fi
if [[ " $STAGE " == *" study "* ]]; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  rehearsal=()
  [[ $DEV == cpu ]] && rehearsal=(--epochs 1 --iterations 2 --mipc 4 --seeds 1 --ipc 1 --holdout-per-class 10)
  mkdir -p "$extras/study"
  # the record comes back in $OUT: the GPU teacher's study gets a record of its own
  # (docs/results/, beside the CPU study's; results_record.py refuses to mix teachers)
  $PY benchmarks/fashion_mnist_study.py --teacher "$W/teacher_convnet3.pt" --data-dir "$data" \
    --out "$W/study" --device "$DEV" --record "$extras/study/students.csv" "${rehearsal[@]}" \
    ${NRRDD_STUDY_ARGS:-} >"$extras/study.log" 2>&1
  cp "$W"/study/study.* "$W"/study/methods_* "$extras/study/" 2>/dev/null
  for f in "$W"/study/ipc*/run.json; do d=$(basename "$(dirname "$f")"); cp "$f" "$extras/study/$d.run.json"; done
  note "study: $(( $(date +%s) - t0 )) s; $(grep -c '^| [0-9]' "$W/study/study.md" 2>/dev/null) table rows"
fi
pack && rm -rf "$extras"
note "total: $(( $(date +%s) - start )) s"
