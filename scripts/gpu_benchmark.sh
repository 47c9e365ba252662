#!/usr/bin/env bash
# The GPU benchmark of docs/PERFORMANCE.md in one command, for a machine with an H100/H200-class GPU.
#
# The device machines have no internet: the Python packages they lack (captum, monai, nibabel, pynrrd,
# torchio and its SimpleITK/Deprecated) travel as wheels in .whl/ at the repository root. Fetch them
# once on a machine with internet (Python 3.12, manylinux x86-64, the device's interpreter):
#
#     scripts/gpu_benchmark.sh --fetch-wheels          # fills .whl/ (about 60 MB; .whl/ is git-ignored)
#
# then, on the device (the device tool: carry [".whl"], OUT is set there; elsewhere ./bench-out):
#
#     bash scripts/gpu_benchmark.sh                    # all steps, CUDA: 570 s, one call with timeout_s 600
#     bash scripts/gpu_benchmark.sh --steps capped,gradient --step-limit 280    # or two calls with
#     bash scripts/gpu_benchmark.sh --steps perturb,options --step-limit 280    # more time per step
#     bash scripts/gpu_benchmark.sh --device cpu --quick --sizes 24 --study-size 16 --study-skip torch.compile
#                                                      # a dry run on CPU
#
# Steps, in this order (each under its own time limit, 100/205/160/105 s or --step-limit, each writing
# its JSON after every method, so a step that runs out of time still returns what it measured):
#   1. options  - bf16/fp16 autocast, torch.compile, channels-last-3d, cudnn.benchmark on a 128^3 cube
#   2. capped   - IG-50, Saliency, SmoothGrad, GradCAM on the TOF-sized 448x448x160, then 256^3, under
#                 an 8 GB memory cap (plain Captum's out-of-memory is reported as a row)
#   3. gradient - Saliency, IntegratedGradients (50 steps), SmoothGrad, GradCAM on sample and 256^3
#   4. perturb  - Occlusion and KernelShap on sample and 256^3
# Files: $OUT/bench_<step>.json, $OUT/gpu_benchmark.log, $OUT/nvidia-smi.txt.
set -uo pipefail

cd "$(dirname "$0")/.."
DEVICE=cuda QUICK="" SIZES="" STUDY_SIZE="" STUDY_SKIP="" CAP=8 STEPS="options,capped,gradient,perturb" STEP_LIMIT=""
# seconds per step: together 570 s, inside one 600 s device call; the TOF-sized volume alone takes
# ~40 s to generate on one core, so the capped step gets the most
declare -A LIMIT=([options]=100 [capped]=205 [gradient]=160 [perturb]=105)
while [ $# -gt 0 ]; do
    case "$1" in
        --fetch-wheels) FETCH=1 ;;
        --device) DEVICE="$2"; shift ;;
        --quick) QUICK="--quick" ;;
        --sizes) SIZES="$2"; shift ;;
        --study-size) STUDY_SIZE="$2"; shift ;;
        --study-skip) STUDY_SKIP="$2"; shift ;;
        --cap) CAP="$2"; shift ;;
        --steps) STEPS="$2"; shift ;;
        --step-limit) STEP_LIMIT="$2"; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_benchmark.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

WHEELS="captum==0.9.0 monai==1.6.1 nibabel==5.4.2 pynrrd==1.1.3 torchio==1.2.1 simpleitk==2.5.7 deprecated==1.3.1"
if [ -n "${FETCH:-}" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for wheel in $WHEELS; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 --platform any -d .whl "$wheel" || exit 1
    done
    du -sh .whl
    exit 0
fi

OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_benchmark.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'EOF' || { echo "missing packages: carry wheels (scripts/gpu_benchmark.sh --fetch-wheels)"; exit 1; }
import torch, captum, monai, nibabel  # noqa: F401
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
SKIP=""
python3 -c "import torchio" 2>/dev/null || { SKIP="--skip torchesegeta"; echo "torchio missing: the TorchEsegeta runner is skipped"; }
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
date -u; uptime

bench() {  # bench <step> <arguments...>: one step under its own limit
    local step="$1"; shift
    echo "=== $step: esegeta bench --device $DEVICE $QUICK $SKIP $*"
    timeout --signal=INT -k 10 "${STEP_LIMIT:-${LIMIT[$step]}}" python3 -m EsegetaLib.benchmark --device "$DEVICE" $QUICK $SKIP "$@" \
        --json "$OUT/bench_$step.json"
    echo "=== $step: exit $? at $(date -u +%H:%M:%S)"
}

GRADIENT="Saliency,IntegratedGradients,SmoothGrad,GradCAM"
if [ "$DEVICE" = cpu ]; then BIG="${SIZES:-64}"; CAPPED="${SIZES:-64}"; else BIG="${SIZES:-sample,256}"; CAPPED="${SIZES:-tof,256}"; fi
for step in ${STEPS//,/ }; do
    case "$step" in
        options) bench options --sizes "" --options-study ${STUDY_SIZE:+--study-size "$STUDY_SIZE"} \
                     ${STUDY_SKIP:+--study-skip "$STUDY_SKIP"} ;;
        capped) bench capped --sizes "$CAPPED" --methods "IntegratedGradients,Saliency,SmoothGrad,GradCAM" \
                    --memory-cap-gb "$CAP" ;;
        gradient) bench gradient --sizes "$BIG" --methods "$GRADIENT" ;;
        perturb) bench perturb --sizes "$BIG" --methods Occlusion,KernelShap ;;
        *) echo "unknown step $step (options, capped, gradient, perturb)"; exit 2 ;;
    esac
done
ls -l "$OUT"
