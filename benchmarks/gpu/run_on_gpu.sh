#!/usr/bin/env bash
# Install, test and benchmark the CUDA toy backend on the lent GPU machine
# (issues 9 and 18), in one call: that machine has nvcc, the driver, Python 3.12 and
# numpy but no package registry, and starts bare every time.
#
# Before the call, on a machine with pip (repo root; /.whl/ is git-ignored):
#
#   P="--only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
#   python3 -m pip download --no-deps $P -d .whl mako markupsafe platformdirs pytools \
#       setuptools siphash24 typing_extensions wheel twisted treq multipart zope.interface \
#       attrs automat constantly hyperlink incremental idna \
#       pyopenssl cryptography cffi pycparser service_identity pyasn1 pyasn1_modules
#   (numpy, prometheus_client and hypothesis are already on that machine's image)
#   python3 -m pip download --no-binary :all: --no-deps --no-build-isolation -d .whl pycuda==2026.1
#       (the last needs the 'wheel' package importable, for pip's metadata step)
#
# then run it with .whl carried:  bash benchmarks/gpu/run_on_gpu.sh
# A pycuda wheel built here is copied to $OUT; put it in .whl/ and the next
# run skips the two-minute build.  Everything lands in $OUT (run.log, trial.log,
# batching.json, batching.md; results.json and results.md with BENCH_GPU=1).
# Knobs: QUICK=1 (few samples), PROFILE=1 / PROFILE_GIL=1 (py-spy, all samples /
# the GIL's holder only), CLIENT_PROCS=N (processes for the 16 clients),
# SKIP_INSTALL=1 SKIP_TESTS=1 (a second tree in the same lease: copy it into the
# repo as an untracked folder and run its copy of this script after this one).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/cc50-gpu-out}
SITE=${SITE:-/tmp/cc50-site}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

export PYTHONUNBUFFERED=1
export CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
export PATH=$CUDA_ROOT/bin:$PATH
# Keep NVLink multicast off, as the machine's notes ask of every program.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

step() { echo "=== $(date -u +%H:%M:%S) $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -2
$PY --version
nproc

if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: SITE is ready (a dry run elsewhere)
    step "install carried wheels into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl || { echo "FAILED: wheel install"; exit 1; }
fi
export PYTHONPATH=$SITE:$REPO

if ! $PY -c "import pycuda.driver" 2>/dev/null; then
    step "build pycuda from the sdist"
    build=/tmp/pycuda-build
    rm -rf "$build" && mkdir -p "$build"
    tar xzf "$REPO"/.whl/pycuda-*.tar.gz -C "$build" || { echo "FAILED: no pycuda sdist in .whl/"; exit 1; }
    src=$(echo "$build"/pycuda-*)
    curand=""  # on by default; configure.py has only the --no- switch
    ls "$CUDA_ROOT"/lib64/libcurand.so* >/dev/null 2>&1 || curand=--no-cuda-enable-curand
    # configure.py writes siteconf.py, which also skips setup's 10 s countdown.
    (cd "$src" && $PY configure.py --cuda-root="$CUDA_ROOT" $curand) || { echo "FAILED: configure"; exit 1; }
    started=$(date +%s)
    if $PY -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/pycuda-wheel "$src"; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" /tmp/pycuda-wheel/pycuda-*.whl
        cp /tmp/pycuda-wheel/pycuda-*.whl "$OUT"/
    else
        echo "pip wheel failed; trying the plain install from the sdist"
        $PY -m pip install --no-index --no-deps --no-build-isolation --target "$SITE" "$REPO"/.whl/pycuda-*.tar.gz \
            || { echo "FAILED: pycuda build"; exit 1; }
    fi
    echo "pycuda built in $(( $(date +%s) - started )) s"
fi
$PY -c "
import pycuda, pycuda.driver as cuda
cuda.init()
print('pycuda', pycuda.VERSION_TEXT, '|', cuda.Device(0).name(), '| driver API', cuda.get_driver_version())
" || { echo "FAILED: pycuda does not import"; exit 1; }

cd "$REPO" || exit 1

if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1: a second tree in the same lease, for an A/B
step "GPU tests: trial cc50tw.test.test_cuda cc50tw.test.test_batching"
timeout 300 $PY -m twisted.trial --temp-directory=/tmp/trial-gpu cc50tw.test.test_cuda cc50tw.test.test_batching 2>&1 \
    | tee "$OUT/trial.log"
if grep -q "cc50tw.test.test_cuda.CUDAEngineTests" "$OUT/trial.log"; then
    echo "WARNING: some CUDAEngineTests were skipped or failed; see trial.log"
fi
fi

step "benchmark: continuous batching against the floor (issue 18)"
timeout 400 $PY benchmarks/gpu/bench_batching.py --out "$OUT" ${QUICK:+--quick} ${PROFILE:+--profile} ${PROFILE_GIL:+--profile-gil} \
    ${CLIENT_PROCS:+--client-processes $CLIENT_PROCS}
bench=$?

if [ "${BENCH_GPU:-0}" = 1 ]; then
    step "benchmark: engine and end to end, CUDA against the CPU fallback (issue 9)"
    $PY benchmarks/gpu/bench_gpu.py --out "$OUT" --require-cuda ${QUICK:+--quick}
fi

if [ "${FULL_SUITE:-0}" = 1 ]; then
    step "whole suite on this machine (information only)"
    timeout 120 $PY -m twisted.trial cc50tw 2>&1 | tail -25
fi
step "done (bench exit $bench)"
exit $bench
