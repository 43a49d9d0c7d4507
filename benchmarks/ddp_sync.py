"""Gradient averaging over processes: `sync_gradients` (all-reduce after the backward, what the scripts did before
they moved to DDP) against torch's DistributedDataParallel (all-reduce of each gradient bucket as soon as the
backward has produced it, what the scripts do now: common/utils.py `data_parallel`).

    torchrun --nproc_per_node 2 benchmarks/ddp_sync.py                                    # tiny GPT-2, CPU
    torchrun --nproc_per_node 2 benchmarks/ddp_sync.py --model-name runs/gpt2-small-shape --batch 4
    torchrun --nproc_per_node 2 benchmarks/ddp_sync.py --cuda                             # NCCL, 2 GPUs

Every rank runs ppo.py's minibatch step on the same shapes (the policy's log-probs and the critic's values,
backward, clip, fused AdamW), on random tokens, three ways in turn for `--rounds` rounds:

- local: no averaging at all (each rank's own gradients): the floor both others are measured against;
- sync_gradients: the written-out averaging after the backward (below);
- ddp: the policy and critic wrapped together in DistributedDataParallel.

It prints seconds per step (rank 0's wall clock, median over rounds) and each method's cost over the floor.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppo
from common.models import load_policy
from common.tasks import make_task
from common.utils import init_distributed


def sync_gradients(parameters, bucket_numel: int = 1 << 24) -> None:
    """Average gradients over ranks after `backward`, in buckets: what DDP does, written out, without the overlap.

    A parameter no rank used keeps grad None (the optimizer skips it, as in one process); one that some rank used
    gets zeros where it was unused, so that every rank sends the same tensors."""
    if not dist.is_initialized():
        return
    params = [p for p in parameters if p.requires_grad]
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(used)
    params = [p for p, u in zip(params, used.tolist(), strict=True) if u > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world_size, bucket = dist.get_world_size(), []
    for i, p in enumerate(params):
        bucket.append(p)
        if sum(q.numel() for q in bucket) >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            flat /= world_size
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            bucket = []


class PolicyAndCritic(nn.Module):
    """The two trainable models of ppo.py's minibatch step as one module, so DDP sees every parameter."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, start):
        logprobs, _ = ppo.forward_logprobs(self.policy, input_ids, attention_mask, start, 1.0, entropy_grad=False)
        return logprobs, self.critic(input_ids, attention_mask, start)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-name", default="tiny-gpt2")
    p.add_argument("--batch", type=int, default=16, help="sequences per rank per step (ppo.py's local minibatch)")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--response-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=4, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False, help="NCCL between GPUs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args.cuda)
    if world_size < 2:
        raise SystemExit("run under torchrun with --nproc_per_node 2 (or more)")
    torch.manual_seed(0)
    policy = load_policy(args.model_name, make_task("sentiment"), device)
    critic = ppo.Critic(policy).to(device)
    both = PolicyAndCritic(policy, critic)
    ddp = DistributedDataParallel(both)  # broadcasts rank 0's weights: every rank starts identical
    parameters = list(both.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=True)
    vocab = policy.model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens + args.response_tokens), generator=gen).to(device)
    mask, start = torch.ones_like(ids), args.prompt_tokens

    def step(method: str) -> None:
        model = ddp if method == "ddp" else both
        logprobs, values = model(ids, mask, start)
        loss = -logprobs.mean() + values.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if method == "sync_gradients":
            sync_gradients(parameters)
        nn.utils.clip_grad_norm_(parameters, 0.5)
        optimizer.step()

    def timed(method: str) -> float:
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(args.steps):
            step(method)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        return (time.perf_counter() - begin) / args.steps

    methods = ("local", "sync_gradients", "ddp")
    for method in methods:  # warm-up
        step(method)
    seconds = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:
            seconds[method].append(timed(method))
    median = {m: statistics.median(v) for m, v in seconds.items()}
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} thread(s) per rank"
    print(f"{args.model_name}, {world_size} processes ({where}), {args.batch} x {ids.shape[1]} tokens per rank")
    for m in methods:
        extra = median[m] - median["local"]
        print(f"  {m:15s} {median[m]:.4f} s per step ({extra:+.4f} s, {100 * extra / median['local']:+.1f}%)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
