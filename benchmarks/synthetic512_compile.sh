#!/usr/bin/env bash
# The synthetic512 run's training time from empty compile caches and again from the caches it filled
# (issue 10: the 4x; the first, compiling step is most of what separates the two). Both runs use the
# fast path's defaults on one GPU, one after the other, each into its own experiment folder:
#
#   bash benchmarks/synthetic512_compile.sh OUT_DIR [HOCON LINES ...]
#
# OUT_DIR/{cold,warm}.log are the runs' stdout, OUT_DIR/times.txt their wall times and
# OUT_DIR/summary.txt benchmarks/epoch_summary.py of both (training time, the first epoch's compile).
# The inductor and Triton caches live in OUT_DIR/cache (emptied first). The subject is generated
# before the first run if missing (BASE_CONF=<conf> replaces benchmarks/synthetic512.conf).
set -uo pipefail
out=$1; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
base=$(realpath "${BASE_CONF:-$repo/benchmarks/synthetic512.conf}")
mkdir -p "$out"; out=$(realpath "$out")
cd "$repo" || exit 1
rm -rf "$out/cache"
export TORCHINDUCTOR_CACHE_DIR="$out/cache/inductor" TRITON_CACHE_DIR="$out/cache/triton"
for name in cold warm; do
  { echo "include \"$base\""
    echo "train.exps_folder = \"$out/exp_$name\""
    for line in "$@"; do echo "$line"; done; } > "$out/$name.conf"
done
python -c "import sys; sys.path.insert(0, 'code')
from pointavatar.config import load_conf
from pointavatar.engine.experiment import Experiment
Experiment(load_conf('$out/cold.conf')).ensure_data()
" || exit 1
for name in cold warm; do
  t0=$(date +%s)
  python scripts/exp_runner.py --conf "$out/$name.conf" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name: $(( $(date +%s) - t0 )) s, exit $rc" >> "$out/times.txt"
done
python benchmarks/epoch_summary.py "$out/cold.log" "$out/warm.log" > "$out/summary.txt" 2>&1
for name in cold warm; do echo "$name: $(grep -h "PSNR" "$out/$name.log" | tail -1)"; done | tee -a "$out/summary.txt"
cat "$out/times.txt"
