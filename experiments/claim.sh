#!/usr/bin/env bash
# FATHOM against the grid-tuned static FedAvg, end to end: sweep, then report.
#
#   bash experiments/claim.sh quickstart [OUT]   # embedded task, ~30 min on a 2-core CPU
#   bash experiments/claim.sh femnist [OUT]      # FEMNIST-shaped data, EMNIST CNN (accelerator)
#   bash experiments/claim.sh femnist_cpu [OUT]  # the same data with an MLP, 43-76 min on a 2-core
#                                                # CPU with XLA_FLAGS=--xla_force_host_platform_device_count=2
#   bash experiments/claim.sh femnist_real [OUT]        # real FEMNIST at data/femnist
#   bash experiments/claim.sh stackoverflow_real [OUT]  # real Stack Overflow at data/stackoverflow
#
# Starting it again skips finished runs and resumes unfinished ones. Extra arguments after OUT
# (e.g. --config.num_devices=1) go to every run. PYTHON picks the interpreter (e.g. .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: experiments/claim.sh TASK [OUT] [--config.X=V ...]; TASK: quickstart, femnist, \
femnist_cpu, femnist_real, stackoverflow_real"
task="${1:?$usage}"
shift
# OUT is optional: an argument that starts with - is the first override, not OUT; an empty
# OUT is the default.
out="runs/claim_$task"
if [[ $# -ge 1 && "$1" != -* ]]; then
  out="${1:-$out}"
  shift
fi
case "$task" in
  quickstart) targets=0.3,0.4,0.45 ;;
  femnist|femnist_cpu) targets=0.5,0.7,0.8,0.9,0.95,0.98 ;;  # generated data: an MLP reaches 0.99
  femnist_real) targets=0.5,0.7,0.8 ;;
  stackoverflow_real) targets=0.15,0.2,0.23 ;;
  *) echo "experiments/claim.sh: unknown task '$task'; $usage" >&2
     exit 2 ;;
esac
"${PYTHON:-python}" launch/sweep.py --sweep="sweeps/claim_$task.py" --out="$out" --vmap_seeds "$@"
"${PYTHON:-python}" launch/report.py "$out" --out="$out/report" --targets="$targets" --notiming
echo "report: $out/report/report.md"
