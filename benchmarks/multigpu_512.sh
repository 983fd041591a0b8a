#!/usr/bin/env bash
# Training on K GPUs against 1 GPU of the same machine (issue 12, item 7): benchmarks/synthetic512.conf
# trained with torchrun on K GPUs and with the plain command on one, then evaluated; epoch throughput at
# the final point count and test PSNR of both, as JSON.
#
#   bash benchmarks/multigpu_512.sh --out DIR [--gpus K] [--budget SECONDS] [--lr_scaling S] [--nepoch N]
#                                            [--only K|1] [--work DIR] [--set 'KEY = VALUE']... [--tiny]
#
#   --out DIR        where the results go: summary.json (benchmarks/multigpu_summary.py), env.txt
#                    (commit, torch, GPUs), logs/ (each run's output)
#   --gpus K         ranks of the multi-GPU run (default 2); the other run is the single-process command
#   --budget S       stop cleanly before S seconds have passed (each run gets the time left, minus a
#                    margin, and is stopped with SIGTERM); run the same command again to continue
#   --lr_scaling S   train.lr_rank_scaling of the K-GPU run: linear (the default: K x the conf's rate),
#                    sqrt or none
#   --nepoch N       last epoch of both runs (default: the conf's, 82)
#   --only K|1       run only that one (the summary covers whatever is done)
#   --work DIR       run folders, confs and logs (default data/experiments/multigpu512, or
#                    DIR/work with --tiny); kept between calls, so a second call resumes
#   --set LINE       a HOCON line added to both runs' confs (repeatable), e.g.
#                    --set 'model.implementation = "reference"' --set 'model.tf32 = false' --set 'train.cuda_graph = false'
#   --tiny           smoke test on the CPU with gloo: the tests' tiny subject and conf (32x32, 2 x 2
#                    frames, small networks), 3 epochs; seconds, not a measurement
#
# Each run trains then evaluates (exp_runner). A run whose k<K>.finished marker exists is skipped; any
# other is started with --is_continue (which starts fresh when there is nothing to resume), so a call
# cut by --budget or by a time limit resumes at the last checkpoint (every 5 epochs in the conf) on the
# next call, and "resuming continues exactly" (README) keeps the results those of one run.
#
# Both runs use the conf's engine: since commit a1da11b the defaults take the fast path with TF32 on
# CUDA; the recorded measurement (benchmarks/RESULTS.md, 2026-11-30: 1.91x, -0.16 dB) was of the
# reference path: repeat it with --set 'model.implementation = "reference"' --set 'model.tf32 = false'
# --set 'train.cuda_graph = false'.
#
# On a two-H200 machine the 1-GPU run takes about 7 min (367 s of training on one H200, README), the
# 2-GPU run about half of its training time more, plus the subject's generation the first time
# (~100 s, CPU): about 13 min in all, so with a 10-minute limit per call:
#     bash benchmarks/multigpu_512.sh --out "$OUT" --budget 570     # repeat until summary.json says "complete": true
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=""; gpus=2; budget=0; lr_scaling=linear; nepoch=""; only=""; work=""; tiny=0; sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --lr_scaling) lr_scaling=$2; shift 2 ;;
    --nepoch) nepoch=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --tiny) tiny=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "--out DIR is required (see --help)" >&2; exit 2; }
if [ $tiny = 1 ] && [ ${#sets[@]} -gt 0 ]; then echo "--set applies to the 512 runs, not to --tiny" >&2; exit 2; fi
start=$(date +%s)
mkdir -p "$out/logs"
out=$(realpath "$out")
if [ -z "$work" ]; then
  if [ $tiny = 1 ]; then work="$out/work"; else work="$repo/data/experiments/multigpu512"; fi
fi
mkdir -p "$work"
work=$(realpath "$work")
cd "$repo" || exit 1
export PYTHONPATH="$repo/code${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}  # the interpreter with PyTorch (the GPU machines have python3 only)
# NVLink multicast stays off (the GPU machines set these; kept if a caller's environment lacks them).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
device_flag=()
[ $tiny = 1 ] && device_flag=(--device cpu)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | head -c 1 | sed 's/./(with uncommitted changes)/')"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
  echo "ranks: $gpus, lr_rank_scaling: $lr_scaling, nepoch: ${nepoch:-conf}, tiny: $tiny, work: $work"
  for line in "${sets[@]}"; do echo "set: $line"; done
} > "$out/env.txt" 2>&1

# The two confs: the same conf, each run in its own experiment folder (lr_rank_scaling acts on K ranks only).
if [ $tiny = 1 ]; then
  "$py" - "$work" "$gpus" "$lr_scaling" <<'EOF' || exit 1
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from run_fixtures import SUBJECT1, make_subject, tiny  # the tests' tiny subject and conf

from pointavatar.config import save_conf

work, k, scaling = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = work / "data"
if not (data / "synthetic" / "synthetic_manifest.json").is_file():
    make_subject(data)
small = {  # as tests/train/test_distributed.py: a step of the shipped networks costs seconds on a CPU
    "model.geometry_network.dims": [32, 32, 32, 32],
    "model.geometry_network.skip_in": [2],
    "model.geometry_network.multires": 2,
    "model.deformer_network.dims": [32, 32],
    "model.rendering_network.dims": [16],
    "train.nepoch": 2,
    "train.lr_rank_scaling": scaling,
}
for ranks in (k, 1):
    save_conf(tiny(SUBJECT1, data, work / f"k{ranks}", **small), work / f"k{ranks}.conf")
EOF
else
  # The subject first, on the CPU, unless the same one is there (the runs would generate it too).
  "$py" - >> "$out/logs/data.txt" 2>&1 <<'EOF' || { echo "data generation failed: $out/logs/data.txt" >&2; exit 1; }
from pointavatar.config import load_conf
from pointavatar.synthetic import ensure_synthetic_subject

ds = load_conf("benchmarks/synthetic512.conf").dataset
s = ds.synthetic
print(ensure_synthetic_subject(ds.data_folder, ds.subject_name, ds.train.img_res[0], s.train_frames, s.test_frames, s.seed))
EOF
  for ranks in "$gpus" 1; do
    {
      echo "include \"$repo/benchmarks/synthetic512.conf\""
      echo "train.exps_folder = \"$work/k$ranks\""
      echo "train.lr_rank_scaling = $lr_scaling"
      for line in "${sets[@]}"; do echo "$line"; done
    } > "$work/k$ranks.conf"
  done
fi

run() {  # run K: train (or resume) and evaluate the K-rank run, within the budget
  local k=$1 left limit rc log
  if [ -f "$work/k$k.finished" ]; then echo "k$k: finished before; skipped"; return 0; fi
  limit=()
  if [ "$budget" -gt 0 ]; then
    left=$(( budget - ($(date +%s) - start) - 30 ))  # 30 s for the summary and the copy of the logs
    if [ $left -lt 60 ]; then echo "k$k: not started, ${left} s left of --budget $budget"; return 1; fi
    limit=(timeout --signal=TERM --kill-after=20 "$left")
  fi
  mkdir -p "$work/k$k"
  log="$work/k$k/log-$(date +%Y%m%d-%H%M%S).txt"
  local args=(scripts/exp_runner.py --conf "$work/k$k.conf" --is_continue "${device_flag[@]}")
  [ -n "$nepoch" ] && args+=(--nepoch "$nepoch")
  echo "k$k: started $(date +%H:%M:%S), log $log"
  if [ "$k" = 1 ]; then
    "${limit[@]}" "$py" "${args[@]}" > "$log" 2>&1
  else
    "${limit[@]}" "$py" -m torch.distributed.run --standalone --nproc_per_node "$k" "${args[@]}" > "$log" 2>&1
  fi
  rc=$?
  echo "k$k: exit $rc at $(date +%H:%M:%S)"
  if [ $rc = 0 ]; then touch "$work/k$k.finished"; else tail -5 "$log" | tr '\r' '\n' | tail -5; fi
  return $rc
}

status=0
for k in "$gpus" 1; do
  if [ -z "$only" ] || [ "$only" = "$k" ]; then run "$k" || status=1; fi
done
cp "$work"/k*/log-*.txt "$work"/k*.conf "$out/logs/" 2>/dev/null
"$py" benchmarks/multigpu_summary.py --work "$work" --ranks "$gpus" --out "$out/summary.json" > /dev/null || status=1
echo "summary: $out/summary.json (complete: $("$py" -c "import json; print(json.load(open('$out/summary.json'))['complete'])"))"
exit $status
