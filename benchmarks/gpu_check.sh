#!/usr/bin/env bash
# The CUDA path on a real GPU, in one prepared run (about 6 minutes on an H200):
#   1. correctness, all at once: every script for a few updates under bf16 autocast, and the first-update
#      invariants of tests/test_precision.py (ratio 1, clipfrac 0, KL 0, NLPO's mask_mismatch 0) on the GPU;
#   2. speed, one run at a time: ppo.py's default run (samples/s, peak GPU memory), then
#      benchmarks/ppo_phases.py (per-phase time, training-phase MFU against the measured matmul peak) at the
#      built-in tiny GPT-2 and at GPT-2-small shape (benchmarks/gpt2_small.py), response lengths 24/48/96
#      (the cost curve), fp32 beside bf16, and nlpo.py; and what per-row seeded sampling costs in generation.
#
#     bash benchmarks/gpu_check.sh                  # writes gpu_check/ (logs, summary.txt, phases.json)
#     GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh  # a dry run on the CPU (a 1-layer, 64-wide "GPT-2-small")
#
# Prints one PASS/FAIL line per check; the last lines of a failing check's log follow it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_DIR:-gpu_check}
big=${GPU_CHECK_BIG:-runs/gpt2-small-shape}  # where the GPT-2-small-shaped model is (built if missing)
py=${PYTHON:-$(command -v python || command -v python3)}  # the interpreter that has torch (python3 on some images)
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then  # a dry run of this script on a machine without a GPU (bf16 on the CPU)
  echo "no GPU: dry run on the CPU" | tee -a "$summary"
  export CUDA_VISIBLE_DEVICES=""
  shape="--layers 1 --width 64" phase_flags="--updates 1 --rollout-batch-size 8 --minibatch-size 8" bf16=on
else
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" \
    | tee -a "$summary" || exit 1
  shape="" phase_flags="--updates 2" bf16=auto
fi

check() {  # check NAME COMMAND...: run it, log it, one line in the summary
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "$out/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s): $(tail -n 1 "$out/$name.log")" | tee -a "$summary"
  else
    echo "FAIL $name ($((SECONDS - start)) s)" | tee -a "$summary"
    tail -n 15 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
  fi
}

# 1. correctness: independent runs, in parallel (their speed is not measured)
TINY_PPO="--total-updates 3 --rollout-batch-size 16 --minibatch-size 8 --ppo-epochs 2 --eval-episodes 16 --eval-every 3"
check ppo_gpt2 "$py" ppo.py $TINY_PPO --output-dir "$out/runs" &
check ppo_t5 "$py" ppo.py $TINY_PPO --model-name tiny-t5 --output-dir "$out/runs" &
check ppo_grue_no_value_clip "$py" ppo.py $TINY_PPO --clip-range-value None --top-k 50 --output-dir "$out/runs" &
check nlpo_gpt2 "$py" nlpo.py $TINY_PPO --mask-update-every 2 --output-dir "$out/runs" &
check ilql_sentiment "$py" ilql.py --total-steps 20 --eval-every 20 --eval-episodes 16 --output-dir "$out/runs" &
check ilql_wordle "$py" ilql.py --task wordle --total-steps 20 --eval-every 20 --eval-episodes 16 --eval-betas 0 16 \
  --output-dir "$out/runs" &
check alol "$py" alol.py --total-steps 20 --eval-every 20 --eval-episodes 16 --offline-size 256 --value-prompts 32 \
  --output-dir "$out/runs" &
check reward_lm "$py" reward_lm.py --num-seeds 1 --queries 64 --queries-per-round 16 --pretrain-size 512 \
  --pretrain-epochs 1 --output-dir "$out/runs" &
check precision_tests env LMRL_TEST_CUDA=1 "$py" -m pytest -q -n 0 -p no:cacheprovider tests/test_precision.py &
check gpt2_small_build "$py" benchmarks/gpt2_small.py --out "$big" $shape &
wait

# 2. speed, one run at a time
check ppo_speed "$py" -c "
import torch, ppo
s = ppo.main(ppo.Args(total_updates=10, eval_every=10, eval_episodes=64, save_model=False, output_dir='$out/runs'))
memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float('nan')
print(f\"ppo.py tiny-gpt2 default run: {s['tokens_per_second']:.0f} tok/s, peak GPU memory {memory:.0f} MiB\")"
phases() {  # phases NAME BF16 FLAGS...: benchmarks/ppo_phases.py, its record appended to phases.json
  local name=$1 precision=$2; shift 2
  check "$name" timeout 150 "$py" benchmarks/ppo_phases.py $phase_flags --peak --json "$out/phases.json" "$@" \
    --bf16 "$precision" --output-dir "$out/runs"
  sed -n '/samples\/s/,$p' "$out/$name.log" >> "$summary"
}
for length in 24 48 96; do
  phases "phases_tiny_$length" $bf16 --response-length $length
done
for length in 24 48 96; do
  phases "phases_gpt2_small_$length" $bf16 --model-name "$big" --response-length $length
done
phases phases_gpt2_small_48_fp32 off --model-name "$big" --response-length 48
phases phases_nlpo_gpt2_small_48 $bf16 --script nlpo.py --model-name "$big" --response-length 48
# what per-row seeded sampling costs in generation (benchmarks/generation.py)
check generation_tiny "$py" benchmarks/generation.py --cuda --repeats 3
sed -n '2,3p' "$out/generation_tiny.log" >> "$summary"
check generation_gpt2_small "$py" benchmarks/generation.py --cuda --repeats 3 --model-name "$big"
sed -n '2,3p' "$out/generation_gpt2_small.log" >> "$summary"
echo "summary: $summary"
