#!/usr/bin/env bash
# Issue 15's digit tables: hard attention (REINFORCE), soft attention, random glimpses, no
# attention and the CNN, each trained for the same wall-clock, tested on one path per image, on
# three seeds of cluttered60 and translated60 at RAM's size. One comparison at a time (they are
# timed: never run anything else meanwhile); then each soft run is tested again with its map read
# out by argmax (one cell per glimpse: hard attention's control), and one table and one
# validation-error plot per task.
# Usage: bash benchmarks/digit_tables.sh [OUT_DIR] [SECONDS] [SEEDS]
set -euo pipefail
out=${1:-benchmarks/runs/digits}
seconds=${2:-120}
seeds=${3:-0 1 2}
mkdir -p "$out"
for variant in cluttered60 translated60; do
  dirs=()
  for seed in $seeds; do
    dir="$out/${variant}_s$seed"
    python -m rl_attn.compare +preset=ram60 task.variant="$variant" \
      'agents=[reinforce,soft,random,no_attention,cnn]' 'cells_per_step=[1]' \
      agent.reward=correct agent.test_mode=sample agent.temperature=1 \
      '+overrides.cnn=["encoder=glimpse"]' trainer.max_time_s="$seconds" trainer.max_steps=1000000 \
      trainer.eval_interval=100 trainer.progress=false trainer.seed="$seed" hydra.run.dir="$dir" \
      > "$dir.log" 2>&1 || { echo "failed: see $dir.log"; exit 1; }
    python -m rl_attn.evaluate checkpoint="$dir/soft" test_mode=argmax beam_size=1 meteor=false \
      >> "$dir.log" 2>&1 || { echo "failed: see $dir.log"; exit 1; }
    dirs+=("$dir")
  done
  python benchmarks/compare_seeds.py "$out/$variant.png" "${dirs[@]}"
done
