#!/usr/bin/env bash
# Run-to-run spread of the demo: K runs of confs/demo.conf with different train.seed values, in parallel
# on one device, each into its own experiment folder; prints one "PSNR" line per run.
#
#   bash benchmarks/demo_spread.sh OUT_DIR DEVICE SEED... [-- EXTRA HOCON LINES]
#   e.g. bash benchmarks/demo_spread.sh /tmp/spread cuda 1 2 3
#
# The synthetic subject is generated once first (a shared data folder), then the runs start together.
# With OLD_REPO=<path to another checkout> the same is done with that checkout's code (its conf has no
# train.seed: its runs are unseeded), for before/after comparisons of a change.
set -uo pipefail
out=$1; device=$2; shift 2
seeds=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  seeds+=("$1"); shift
done
repo=${OLD_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
mkdir -p "$out"
data=$(realpath "$out")/data
cd "$repo" || exit 1
first=1
for s in "${seeds[@]}"; do
  conf="$out/demo_$s.conf"
  {
    echo "include \"$repo/confs/demo.conf\""
    echo "train.exps_folder = \"$(realpath "$out")/exp_$s\""
    echo "dataset.data_folder = \"$data\""
    echo "model.flame_model_path = \"$data/synthetic/flame/generic_model.pkl\""
    echo "model.flame_landmark_path = \"$data/synthetic/flame/landmark_embedding.npy\""
    [ -z "${OLD_REPO:-}" ] && echo "train.seed = $s"
    for line in "${extra[@]}"; do echo "$line"; done
  } > "$conf"
  if [ $first = 1 ]; then  # generate the data once, before the parallel runs
    python -c "
import sys; sys.path.insert(0, 'code')
from pointavatar.config import load_conf
c = load_conf('$conf').dataset
try:
    from pointavatar.synthetic import ensure_synthetic_subject
except ImportError:
    from pointavatar.data.synthetic import ensure_synthetic_subject
ensure_synthetic_subject(c.data_folder, c.subject_name, res=c.train.img_res[0], train_frames=c.synthetic.train_frames, test_frames=c.synthetic.test_frames, seed=c.synthetic.seed)
" || exit 1
    first=0
  fi
done
start=$(date +%s)
for s in "${seeds[@]}"; do
  (PYTHONPATH=code:${PYTHONPATH:-} python scripts/exp_runner.py --conf "$out/demo_$s.conf" --device "$device" \
     > "$out/log_$s.txt" 2>&1; echo "exit $?" >> "$out/log_$s.txt") &
done
wait
echo "wall $(( $(date +%s) - start )) s for ${#seeds[@]} parallel runs"
for s in "${seeds[@]}"; do
  echo "seed $s: $(tr '\r' '\n' < "$out/log_$s.txt" | grep -a '^test: PSNR' | tail -1) $(tail -1 "$out/log_$s.txt")"
done
