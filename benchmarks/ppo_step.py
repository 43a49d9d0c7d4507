"""Before/after of ppo.py's minibatch step: one log-softmax for log-probs and entropy, entropy out of the graph;
and, with --compile, the same step with both transformer trunks under torch.compile.

    python benchmarks/ppo_step.py                      # the built-in tiny GPT-2 (vocabulary 666)
    python benchmarks/ppo_step.py --vocab 50257        # the same trunk with GPT-2's vocabulary size
    python benchmarks/ppo_step.py --compile            # + "compiled": inductor on the policy's and critic's trunks
    python benchmarks/ppo_step.py --model-name runs/gpt2-small-shape --batch 4 --compile --repeats 3

Times one PPO minibatch step (policy and critic forward, clipped losses, backward, AdamW) on a fixed
batch, alternating two ways of getting the log-probs and entropies:

- before: `logprobs_of(logits)` and `entropy_of(logits)` (two log-softmaxes over [B, T, V]), with the
  entropy in the autograd graph even when its coefficient is 0 (ppo.py until this benchmark);
- after: `ppo.forward_logprobs` (one log-softmax; the entropy has no gradient when `--ent-coef` is 0);
- compiled (`--compile`): "after" with `torch.compile` (inductor, static shapes: the batch never changes here)
  around the policy's and the critic's transformer trunks; its compile time is reported apart, not timed.

Reports the median process CPU time per step over the repeats (CPU time moves less than wall time when
the machine is shared). `--vocab` resizes the built-in model's embeddings (random new rows), so the
[B, T, V] passes weigh what they weigh with a real GPT-2 vocabulary on a trunk this small.
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# E402 on purpose: the repository's modules import only once ROOT is on sys.path (run as a script from anywhere)
import ppo  # noqa: E402
from common.models import entropy_of, load_policy, logprobs_of  # noqa: E402
from common.tasks import make_task  # noqa: E402
from common.utils import masked_mean  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-name", default="tiny-gpt2", help="tiny-gpt2 or a local model directory")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time the step with torch.compile on both trunks",
    )
    p.add_argument("--vocab", type=int, default=0, help="resize the vocabulary to this size (0: keep the built-in one)")
    p.add_argument("--batch", type=int, default=16, help="episodes per minibatch (ppo.py's default)")
    p.add_argument("--prompt-tokens", type=int, default=20, help="prompt columns")
    p.add_argument("--response-tokens", type=int, default=24, help="response columns (the sentiment task's)")
    p.add_argument("--steps", type=int, default=8, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant, alternating")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    policy = load_policy(args.model_name, make_task("sentiment"))
    if args.vocab:
        policy.model.resize_token_embeddings(args.vocab, mean_resizing=False)
    critic = ppo.Critic(policy)
    parameters = list(policy.parameters()) + list(critic.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=True)  # as ppo.py
    vocab = policy.model.get_input_embeddings().weight.shape[0]
    B, P, R = args.batch, args.prompt_tokens, args.response_tokens
    ids = torch.randint(0, vocab, (B, P + R))
    attention, mask = torch.ones_like(ids), torch.ones(B, R)
    old_logprobs, advantages = torch.randn(B, R) - 3, torch.randn(B, R)
    old_values, returns = torch.randn(B, R), torch.randn(B, R)

    def before():
        logits, _ = policy(ids, attention, P)
        return logprobs_of(logits, ids[:, P:]), entropy_of(logits)

    def after():
        return ppo.forward_logprobs(policy, ids, attention, P, 1.0, entropy_grad=False)

    def step(logprobs_and_entropy):
        logprobs, entropy = logprobs_and_entropy()
        values = critic(ids, attention, P).float()
        pg_loss, _ = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
        vf_loss, _ = ppo.ppo_value_loss(values, old_values, returns, mask, 0.2)
        loss = pg_loss + 0.5 * vf_loss - 0.0 * masked_mean(entropy, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    variants = {"before": before, "after": after}
    trunks = [policy.model.base_model, critic.trunk.model.base_model]
    compiled_forwards = [torch.compile(trunk.forward) for trunk in trunks] if args.compile else []
    if args.compile:
        variants["compiled"] = after

    def use_compiled(on: bool) -> None:
        """Swap the trunks' compiled forwards in (an instance attribute shadows the class's) or out."""
        for trunk, compiled in zip(trunks, compiled_forwards, strict=False):  # none without --compile
            if on:
                trunk.forward = compiled
            else:
                trunk.__dict__.pop("forward", None)

    seconds = {name: [] for name in variants}
    compile_seconds = None
    for _ in range(args.repeats):
        for name, fn in variants.items():
            use_compiled(name == "compiled")
            start = time.perf_counter()
            step(fn)  # warm-up (the compiled variant's first one compiles the forward and backward)
            if name == "compiled" and compile_seconds is None:
                compile_seconds = time.perf_counter() - start
            start = time.process_time()
            for _ in range(args.steps):
                step(fn)
            seconds[name].append((time.process_time() - start) / args.steps)
    use_compiled(False)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"vocabulary {vocab}, minibatch {B} x {P + R} tokens, {torch.get_num_threads()} thread(s):")
    for name in seconds:
        print(
            f"  {name:6s} {1000 * median[name]:7.1f} ms CPU per step (median of {args.repeats}; "
            f"all {[round(1000 * s, 1) for s in seconds[name]]})"
        )
    print(f"  after / before: {median['after'] / median['before']:.2f}")
    if args.compile:
        ratio = median["compiled"] / median["after"]
        print(f"  compiled / after: {ratio:.2f} (the first compiled step, compiling: {compile_seconds:.0f} s)")
    return median


if __name__ == "__main__":
    main()
