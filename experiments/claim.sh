#!/usr/bin/env bash
# FATHOM against the grid-tuned static FedAvg, end to end: sweep, then report.
#
#   bash experiments/claim.sh quickstart [OUT]   # embedded task, ~20 min on a 2-core CPU
#   bash experiments/claim.sh femnist [OUT]      # FEMNIST-shaped generated task (see the sweep)
#   bash experiments/claim.sh femnist_real [OUT] # real FEMNIST at data/femnist (GPU/TPU)
#
# Starting it again skips finished runs and resumes unfinished ones. Extra arguments after OUT
# (e.g. --config.num_devices=1) go to every run.
set -euo pipefail
cd "$(dirname "$0")/.."
task="${1:?usage: experiments/claim.sh quickstart|femnist|femnist_real [OUT] [--config.X=V ...]}"
out="${2:-runs/claim_$task}"
shift $(( $# >= 2 ? 2 : 1 ))
case "$task" in
  quickstart) targets=0.3,0.4,0.45 ;;
  femnist|femnist_real) targets=0.5,0.7,0.8 ;;
  *) echo "experiments/claim.sh: unknown task '$task' (quickstart, femnist, femnist_real)" >&2
     exit 2 ;;
esac
python launch/sweep.py --sweep="sweeps/claim_$task.py" --out="$out" --vmap_seeds "$@"
python launch/report.py "$out" --out="$out/report" --targets="$targets" --notiming
echo "report: $out/report/report.md"
