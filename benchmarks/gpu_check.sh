#!/usr/bin/env bash
# The CUDA path on a real GPU, in one prepared run (a few minutes): every script for a few updates under bf16
# autocast, the first-update invariants of tests/test_precision.py on the GPU, and ppo.py's speed and peak memory.
#
#     bash benchmarks/gpu_check.sh                  # writes gpu_check/ (logs, summary.txt)
#     GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh  # a dry run of the script on the CPU
#
# Prints one PASS/FAIL line per check and the GPU's name; the last lines of a failing check's log follow it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_DIR:-gpu_check}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then  # a dry run of this script on a machine without a GPU (bf16 on the CPU)
  echo "no GPU: dry run on the CPU" | tee -a "$summary"
  export CUDA_VISIBLE_DEVICES=""
else
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" \
    | tee -a "$summary" || exit 1
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

TINY_PPO="--total-updates 3 --rollout-batch-size 16 --minibatch-size 8 --ppo-epochs 2 --eval-episodes 16 --eval-every 3"
check ppo_gpt2 python ppo.py $TINY_PPO --output-dir "$out/runs"
check ppo_t5 python ppo.py $TINY_PPO --model-name tiny-t5 --output-dir "$out/runs"
check ppo_grue_no_value_clip python ppo.py $TINY_PPO --clip-range-value None --top-k 50 --output-dir "$out/runs"
check nlpo_gpt2 python nlpo.py $TINY_PPO --mask-update-every 2 --output-dir "$out/runs"
check ilql_sentiment python ilql.py --total-steps 20 --eval-every 20 --eval-episodes 16 --output-dir "$out/runs"
check ilql_wordle python ilql.py --task wordle --total-steps 20 --eval-every 20 --eval-episodes 16 --eval-betas 0 16 \
  --output-dir "$out/runs"
check alol python alol.py --total-steps 20 --eval-every 20 --eval-episodes 16 --offline-size 256 --value-prompts 32 \
  --output-dir "$out/runs"
check reward_lm python reward_lm.py --num-seeds 1 --queries 64 --queries-per-round 16 --pretrain-size 512 \
  --pretrain-epochs 1 --output-dir "$out/runs"
# ratio 1, clipfrac 0, KL 0 and NLPO's mask_mismatch 0 after one bf16 update, on the GPU
check precision_tests env LMRL_TEST_CUDA=1 python -m pytest -q -n 0 -p no:cacheprovider tests/test_precision.py
# speed and peak memory of the default run (the built-in tiny model; GPT-2-small shape is the performance issue's)
check ppo_speed python -c "
import torch, ppo
s = ppo.main(ppo.Args(total_updates=10, eval_every=10, eval_episodes=64, save_model=False, output_dir='$out/runs'))
memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float('nan')
print(f\"ppo.py tiny-gpt2: {s['tokens_per_second']:.0f} tok/s, peak GPU memory {memory:.0f} MiB\")"
echo "summary: $summary"
