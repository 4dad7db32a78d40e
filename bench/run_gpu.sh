#!/usr/bin/env bash
# bash bench/run_gpu.sh                  # on the GPU machine, from anywhere inside the checkout
# bash bench/run_gpu.sh --fetch-wheels   # on a machine with PyPI, first: fills .whl/ for the GPU machine
#
# One call on a GPU machine whose python3 (3.12) already has torch and triton but not the rest: install the
# wheels carried in .whl/ into a private folder, run the `gpu`-marked tests, then `bench all --size full`,
# writing bench/results/<gpu>_<yyyymmdd>.{md,json} and its plots, plus a log. When $OUT is set, the report
# files and the log are copied there as well (that is how they come back from a lent machine).
#
# A copy of the tree without .git cannot name its commit: pass it in, e.g.
#   SAMTUNE_GIT_SHA=$(git rev-parse --short=12 HEAD) bash bench/run_gpu.sh
# (on a lent machine, write the sha into the command line you send).
#
# Time: the whole call is meant to fit a 10-minute command limit. The tests get GPU_TEST_TIMEOUT seconds
# (default 150) and the benches BENCH_TIMEOUT (default 420); `bench all` writes the report after each bench, so
# a bench cut off by the timeout loses only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
# Versions the project was developed with; the GPU image lacks these (everything else it has).
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 pycocotools==2.0.11 segment-anything==1.0"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    # shellcheck disable=SC2086  # WHEELS is a list of requirement strings
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
fi

SITE=${SAMTUNE_SITE:-/tmp/samtune-site}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "run_gpu.sh: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF' || exit 2
import torch, triton, zarr, numcodecs, segment_anything, accelerate, matplotlib  # noqa: F401
assert torch.cuda.is_available(), "run_gpu.sh needs a CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, zarr {zarr.__version__}, "
      f"device {torch.cuda.get_device_name()}")
EOF

if [[ -z "${SAMTUNE_GIT_SHA:-}" ]] && ! git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    echo "run_gpu.sh: no .git here and SAMTUNE_GIT_SHA unset: the report will say git_sha=unknown" >&2
fi

RESULTS=$ROOT/bench/results
mkdir -p "$RESULTS"
DAY=$(date -u +%Y%m%d)
LOG=$RESULTS/gpu-run_$DAY.log
WORK=${BENCH_WORK:-/tmp/samtune-bench-work}

echo "== gpu tests" | tee "$LOG"
timeout "${GPU_TEST_TIMEOUT:-150}" "$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$LOG"
TESTS=${PIPESTATUS[0]}
[[ $TESTS == 5 ]] && TESTS=0  # pytest: no test selected

echo "== bench all --size full" | tee -a "$LOG"
timeout "${BENCH_TIMEOUT:-420}" "$PY" -m bench.cli all --size full --out "$RESULTS" --work "$WORK" 2>&1 | tee -a "$LOG"
BENCH=${PIPESTATUS[0]}

if [[ -n "${OUT:-}" ]]; then
    cp "$LOG" "$OUT"/
    for f in "$RESULTS"/*_"$DAY".md "$RESULTS"/*_"$DAY".json "$RESULTS"/*_"$DAY"_*.png; do
        [[ -e "$f" && "$f" != */cpu_* ]] && cp "$f" "$OUT"/
    done
fi
echo "run_gpu.sh: gpu tests exit $TESTS, bench exit $BENCH; report in $RESULTS" | tee -a "$LOG"
[[ $TESTS == 0 && $BENCH == 0 ]]
