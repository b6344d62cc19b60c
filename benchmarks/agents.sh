#!/usr/bin/env bash
# The default run of every agent, one after the other (never in parallel: they share the cores),
# then one table. Usage: bash benchmarks/agents.sh [OUT_DIR] [extra Hydra overrides...]
set -euo pipefail
out=${1:-benchmarks/runs}
shift || true
for agent in soft reinforce reinforce_xu random no_attention; do
  /usr/bin/time -f "$agent: %e s wall" python -m rl_attn.train agent=$agent \
    hydra.run.dir="$out/$agent" trainer.progress=false "$@"
done
python benchmarks/summarize.py "$out"/{soft,reinforce,reinforce_xu,random,no_attention}
