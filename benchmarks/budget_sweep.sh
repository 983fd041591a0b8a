#!/usr/bin/env bash
# model.activation_memory_budget on the GPU (issue 10): the training step at budgets 1.0 (the default on GPUs of 44 GiB and more),
# 0.5, 0.3 and 0.2 with the large-GPU defaults, the geometry piece alone, and the fp32 GPU test of the
# recomputing partition. Meant for a machine with two GPUs (device kind nvidia-h200-x2), in two parts of
# under ten minutes each, the two GPUs busy at once in both:
#
#   bash benchmarks/budget_sweep.sh OUT_DIR a   # GPU 0: budgets 1.0, 0.3 (profiled at 409,600 points);
#                                              # GPU 1: budgets 0.5, 0.2; at 409,600 and 102,400 points
#   bash benchmarks/budget_sweep.sh OUT_DIR b   # GPU 0: budget BUDGET (default 0.3) at 6,400, 25,600 and
#                                              # 204,800 points, then with geometry chunks at 409,600;
#                                              # GPU 1: bench_geometry at each budget, the GPU test case
#
# Each bench_train run writes OUT_DIR/budget_<F>[_<what>].json (and .log); the summary of part a is
# OUT_DIR/summary_a.txt. pyhocon and trimesh must be importable (on the device: wheels carried in .whl/,
# installed by this script into /tmp/site when present).
set -uo pipefail
out=$1
part=${2:-a}
budget=${BUDGET:-0.3}
case "$part" in a | b) ;; *) echo "part must be a or b, got $part" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(realpath "$out")
cd "$repo" || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="$repo/code:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$repo/code${PYTHONPATH:+:$PYTHONPATH}"
fi
B=(benchmarks/bench_train.py --implementation fast --tf32 --cuda-graph --geometry-bf16 --warmup 4 --repeat 20)

train() {  # gpu, name, bench_train arguments...
    local gpu=$1 name=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu python3 "${B[@]}" --data "/tmp/bench_data_$gpu" --out "$out/$name.json" "$@" \
        > "$out/$name.log" 2>&1 || echo "$name: exit $?" >> "$out/failures.txt"
}

case "$part" in
a)
    {
        train 0 budget_1.0 --points 409600 102400 --memory-budget 1.0
        train 0 budget_0.3 --points 409600 102400 --memory-budget 0.3 --profile 409600
    } &
    {
        train 1 budget_0.5 --points 409600 102400 --memory-budget 0.5
        train 1 budget_0.2 --points 409600 102400 --memory-budget 0.2
    } &
    wait
    for f in 1.0 0.5 0.3 0.2; do
        echo "== budget $f"
        grep -E "^N=|memory \(GiB\)|cuda graph" "$out/budget_$f.log"
    done | tee "$out/summary_a.txt"
    ;;
b)
    {
        train 0 "budget_${budget}_small" --points 6400 25600 204800 --memory-budget "$budget"
        train 0 "budget_${budget}_gchunk" --points 409600 --memory-budget "$budget" --geometry-recompute-chunk 131072
    } &
    {
        CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_geometry.py --rows 819200 \
            --variants autocast autocast:budget=0.5 autocast:budget=0.3 autocast:budget=0.2 \
            --out "$out/geometry_budgets.json" > "$out/geometry_budgets.log" 2>&1 \
            || echo "bench_geometry: exit $?" >> "$out/failures.txt"
        CUDA_VISIBLE_DEVICES=1 python3 -m pytest -q -m gpu \
            "tests/model/test_fast_path.py::test_fast_path_equals_reference_on_gpu_in_float32[all-0-pointwise-autograd+budget]" \
            > "$out/gpu_test_budget.txt" 2>&1 || echo "gpu test: exit $?" >> "$out/failures.txt"
    } &
    wait
    tail -3 "$out/gpu_test_budget.txt"
    ;;
esac
[ -f "$out/failures.txt" ] && cat "$out/failures.txt"
exit 0
