"""Side by side with TRL: TRL's GRPO, RLOO and PPO trainers and our ppo.py on the same work.

The work, identical for every trainer (the defaults; the flags below change it for all alike):
- policy: the built-in tiny GPT-2 of the sentiment task (fp32, CPU, dropout off, no gradient checkpointing),
  or `--model DIR`, e.g. the GPT-2-small-shaped model `benchmarks/gpt2_small.py` writes;
- prompts: `make_task("sentiment").train_prompts`; reward: `vader_compound` of the response text;
- each update samples 64 responses of at most 24 new tokens (temperature 1, no top-k/top-p), then
  takes 16 AdamW steps of 16 responses each (4 passes over 4 minibatches), learning rate 1e-4
  constant; 40 updates (2,560 responses);
- afterwards the trained policy is scored by ppo.py's own held-out evaluation: the first 256
  `eval_prompts`, sampled exactly as ppo.py samples, with the RNG seeded to `seed + 12345`.

What differs is each trainer's algorithm with its own defaults: GRPO (8 responses per prompt, group-
normalised advantages, no KL since TRL's beta defaults to 0), RLOO (2 per prompt, leave-one-out
baseline, sequence KL beta 0.05 in the reward), TRL's PPO (separate value model, fixed KL 0.05,
gamma 1) and ppo.py (separate value model, adaptive KL from 0.1, gamma 0.99).

Each trainer runs in its own process (its peak RSS comes from `os.wait4`). Samples per second is
responses / training seconds: `trainer.train()` for TRL, the sum of ppo.py's per-update times for
ours (evaluation is excluded from both).

Usage (TRL and its dependencies are in requirements-bench.txt; `pip install --no-deps -r requirements-bench.txt`):
    python benchmarks/trl_compare.py   # all four, seed 1; also rewrites benchmarks/README.md's table
    python benchmarks/trl_compare.py --seeds 3 --trainers ppo.py,grpo
    python benchmarks/trl_compare.py --model runs/gpt2-small-shape --trainers ppo.py,trl-ppo --batch 16 --minibatch 4 \
        --updates 2 --response-length 24 --eval-episodes 32 --no-readme   # GPT-2-small shape
    python benchmarks/trl_compare.py --help

TRL 1.12.0 is pinned because it is the last release with PPOTrainer (trl.experimental.ppo); its
PPOTrainer takes a reward *model*, so the VADER reward is given to it by a thin module whose
rewards `get_reward` reads from the decoded response (see `trl_ppo`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
sys.path[:0] = [ROOT, HERE]
START, END = "<!-- trl-compare:start -->", "<!-- trl-compare:end -->"
TRAINERS = ("ppo.py", "grpo", "rloo", "trl-ppo")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# The shared work (see the docstring); `--model`, `--batch`, `--minibatch`, `--epochs`, `--response-length` and
# `--eval-episodes` change it for every trainer alike (`configure`).
MODEL, BATCH, MINIBATCH, EPOCHS, RESPONSE_LENGTH, LR, TEMPERATURE, EVAL_EPISODES = (
    "tiny-gpt2",
    64,
    16,
    4,
    24,
    1e-4,
    1.0,
    256,
)


def configure(args) -> None:
    """Set the shared work from the flags, in the parent and in every worker (they get the same flags)."""
    global MODEL, BATCH, MINIBATCH, EPOCHS, RESPONSE_LENGTH, EVAL_EPISODES
    MODEL, BATCH, MINIBATCH, EPOCHS = args.model, args.batch, args.minibatch, args.epochs
    RESPONSE_LENGTH, EVAL_EPISODES = args.response_length, args.eval_episodes


# ----------------------------------------------------------------------------------------------
# Pieces every TRL worker shares
# ----------------------------------------------------------------------------------------------
def vader_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward-function signature around the task's reward (VADER compound of the response)."""
    from common.tasks import vader_compound

    return vader_compound(completions).tolist()


def load_model(task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.models import disable_dropout, resolve_model_path

    path = resolve_model_path(MODEL, task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2 has none; EOS stands in, as in ppo.py (common/models.load_policy)
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    disable_dropout(model)
    return path, model, tokenizer


def heldout_eval(model, tokenizer, task, seed: int) -> dict:
    """ppo.py's evaluation, verbatim in effect: same prompts, sampling, batch size and per-prompt seeds, and the
    same fluency and diversity metrics (perplexity under the trained model, ref_nll under the starting one)."""
    from common.models import Policy
    from common.tasks import evaluate
    from common.utils import episode_seeds

    policy = Policy(model.cpu().eval(), tokenizer)
    _, start_model, start_tokenizer = load_model(task)
    start = Policy(start_model.eval(), start_tokenizer)

    def generate_fn(prompts, indices):
        ids, mask = policy.encode_prompts(prompts, task.max_prompt_tokens, "cpu")
        response, response_mask = policy.generate(
            ids,
            mask,
            RESPONSE_LENGTH,
            task.min_new_tokens,
            temperature=TEMPERATURE,
            seeds=episode_seeds(seed, 1, 0, indices),
        )
        return policy.decode(response, response_mask)

    metrics, _ = evaluate(
        task, generate_fn, EVAL_EPISODES, BATCH, policy=policy, start_model=start, response_length=RESPONSE_LENGTH
    )
    return metrics


def common_config(out_dir: str, seed: int) -> dict:
    """TrainingArguments every TRL trainer gets: CPU fp32, constant LR, no checkpointing, no saving."""
    return dict(
        output_dir=out_dir,
        seed=seed,
        learning_rate=LR,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=16,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


# ----------------------------------------------------------------------------------------------
# One worker per TRL trainer; each returns (trainer, seconds spent in trainer.train())
# ----------------------------------------------------------------------------------------------
def trl_group(name: str, updates: int, seed: int, out_dir: str):
    """GRPO or RLOO: a generation batch of 64 = `steps_per_generation` 4 x 16, reused for
    `num_iterations` 4 passes -> 16 optimizer steps of 16 completions per generation."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from common.tasks import make_task

    task = make_task("sentiment")
    _, model, tokenizer = load_model(task)
    dataset = Dataset.from_list([{"prompt": p} for p in task.train_prompts])
    Config, Trainer = (GRPOConfig, GRPOTrainer) if name == "grpo" else (RLOOConfig, RLOOTrainer)
    config = Config(
        **common_config(out_dir, seed),
        per_device_train_batch_size=MINIBATCH,
        steps_per_generation=BATCH // MINIBATCH,
        num_iterations=EPOCHS,
        max_steps=updates * EPOCHS * BATCH // MINIBATCH,
        max_completion_length=RESPONSE_LENGTH,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
    )
    trainer = Trainer(
        model=model, reward_funcs=vader_reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, model, tokenizer, task


def trl_ppo(updates: int, seed: int, out_dir: str):
    """TRL 1.12's PPOTrainer: rollout of 64 (`per_device_train_batch_size`), 4 minibatches of 16,
    4 epochs; the value model is a second copy of the tiny GPT-2 with a scalar `score` head."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    from common.tasks import make_task, vader_compound

    task = make_task("sentiment")
    path, model, tokenizer = load_model(task)
    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)

    class PythonReward(torch.nn.Module):
        """A stand-in `reward_model`: PPOTrainer only moves it to the device and hands it to `get_reward`,
        which we wrap so that it returns the task's reward of the decoded response instead."""

    original_get_reward = ppo_module.get_reward

    def get_reward(model_, query_responses, pad_token_id, context_length):
        if not isinstance(model_, PythonReward):
            return original_get_reward(model_, query_responses, pad_token_id, context_length)
        responses = query_responses[:, context_length:]
        texts = tokenizer.batch_decode(
            responses.masked_fill(responses == pad_token_id, tokenizer.eos_token_id), skip_special_tokens=True
        )
        scores = torch.tensor(vader_compound(texts), dtype=torch.float32, device=query_responses.device)
        return None, scores, None

    ppo_module.get_reward = get_reward
    dataset = Dataset.from_list(
        [{"input_ids": tokenizer(p)["input_ids"][-task.max_prompt_tokens :]} for p in task.train_prompts]
    )
    config = PPOConfig(
        **common_config(out_dir, seed),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=BATCH // MINIBATCH,
        num_ppo_epochs=EPOCHS,
        total_episodes=updates * BATCH,
        response_length=RESPONSE_LENGTH,
        temperature=TEMPERATURE,
        stop_token="eos",
        num_sample_generations=0,
        local_rollout_forward_batch_size=BATCH,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=model,
        ref_model=None,
        reward_model=PythonReward(),
        train_dataset=dataset,
        value_model=value_model,
        eval_dataset=dataset.select(range(BATCH)),
    )
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, model, tokenizer, task


def worker(name: str, updates: int, seed: int, out_path: str) -> None:
    os.environ.update(OFFLINE)
    import transformers
    import trl

    from common.utils import seed_everything

    transformers.logging.set_verbosity_error()
    seed_everything(seed, deterministic=True)  # as ppo.py does by default
    with tempfile.TemporaryDirectory() as out_dir:
        if name == "trl-ppo":
            trainer, seconds, model, tokenizer, task = trl_ppo(updates, seed, out_dir)
        else:
            trainer, seconds, model, tokenizer, task = trl_group(name, updates, seed, out_dir)
    history = trainer.state.log_history
    train_scores = [
        h.get("reward", h.get("objective/scores")) for h in history if "reward" in h or "objective/scores" in h
    ]
    metrics = heldout_eval(model, tokenizer, task, seed)
    result = {
        "trainer": name,
        "seed": seed,
        "updates": updates,
        "samples": updates * BATCH,
        "train_seconds": seconds,
        "final": metrics,
        "train_scores": train_scores,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{name}: {seconds:.1f}s training, held-out return {metrics['eval/return_mean']:+.3f}", flush=True)


# ----------------------------------------------------------------------------------------------
# Our ppo.py, as a user runs it
# ----------------------------------------------------------------------------------------------
def ours(bench, updates: int, seed: int, run_root: str, log: str, env: dict) -> dict:
    out_dir = os.path.join(run_root, f"ppo__{seed}")
    cmd = [
        sys.executable,
        "ppo.py",
        "--seed",
        str(seed),
        "--total-updates",
        str(updates),
        "--eval-every",
        str(updates),
        "--rollout-batch-size",
        str(BATCH),
        "--minibatch-size",
        str(MINIBATCH),
        "--ppo-epochs",
        str(EPOCHS),
        "--learning-rate",
        str(LR),
        "--response-length",
        str(RESPONSE_LENGTH),
        "--temperature",
        str(TEMPERATURE),
        "--eval-episodes",
        str(EVAL_EPISODES),
        "--model-name",
        MODEL,
        "--no-save-model",
        "--output-dir",
        out_dir,
    ]
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    result = bench.run_child(cmd, log, env=env)
    run_dir = bench.find_run_dir(out_dir)
    if result["returncode"] != 0 or run_dir is None:
        return {**result, "error": bench.last_line(log)}
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    per_update = [BATCH / e.value for e in acc.Scalars("charts/episodes_per_second")]  # seconds of each update
    return {
        **result,
        "trainer": "ppo.py",
        "seed": seed,
        "updates": updates,
        "samples": updates * BATCH,
        "train_seconds": sum(per_update),
        "initial": summary["initial"],
        "final": summary["final"],
        "train_scores": [e.value for e in acc.Scalars("objective/scores")],
    }


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------
LABELS = {
    "ppo.py": "ours: `ppo.py`",
    "grpo": "TRL `GRPOTrainer`",
    "rloo": "TRL `RLOOTrainer`",
    "trl-ppo": "TRL `PPOTrainer` (experimental)",
}


def comparison_table(results: list[dict], initial: float | None) -> str:
    """Per trainer: mean over seeds; ratios are trainer / ppo.py."""
    from run import fmt, mean_std

    by = {}
    for r in results:
        if "error" not in r:
            by.setdefault(r["trainer"], []).append(r)
    base = by.get("ppo.py")
    base_sps = mean_std([r["samples"] / r["train_seconds"] for r in base])[0] if base else None
    base_rss = mean_std([r["peak_rss_mib"] for r in base])[0] if base else None
    base_gain = (
        (mean_std([r["final"]["eval/return_mean"] for r in base])[0] - initial)
        if base and initial is not None
        else None
    )
    lines = [
        "| trainer | samples/s | ratio to ppo.py | final held-out return | gain over start | ratio to ppo.py "
        "| perplexity | grammatical | distinct-2 | peak RSS (MiB) | ratio to ppo.py | training (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    for name in TRAINERS:
        if name not in by:
            continue
        rs = by[name]
        sps = [r["samples"] / r["train_seconds"] for r in rs]
        finals = [r["final"]["eval/return_mean"] for r in rs]
        rss = [r["peak_rss_mib"] for r in rs]
        gain = mean_std(finals)[0] - initial if initial is not None else None
        lines.append(
            f"| {LABELS[name]} | {fmt(sps, 1)} | {ratio(mean_std(sps)[0], base_sps)} | {fmt(finals, 3, signed=True)} "
            f"| {'n/a' if gain is None else f'{gain:+.3f}'} | {ratio(gain, base_gain)} "
            + "".join(
                f"| {fmt([r['final'].get('eval/' + k) for r in rs], 2)} "
                for k in ("perplexity", "grammatical", "distinct_2")
            )
            + f"| {fmt(rss, 0)} "
            f"| {ratio(mean_std(rss)[0], base_rss)} | {fmt([r['train_seconds'] for r in rs], 0)} |"
        )
    return "\n".join(lines)


def work_flags(args) -> list[str]:
    """The flags that set the shared work, for a worker."""
    return [
        *("--model", args.model, "--batch", str(args.batch), "--minibatch", str(args.minibatch)),
        *("--epochs", str(args.epochs), "--response-length", str(args.response_length)),
        *("--eval-episodes", str(args.eval_episodes)),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {', '.join(TRAINERS)}")
    p.add_argument("--updates", type=int, default=40, help="updates (rollouts of --batch responses) per trainer")
    p.add_argument("--model", default=MODEL, help="tiny-gpt2 (built-in) or a causal LM directory (gpt2_small.py)")
    p.add_argument("--batch", type=int, default=BATCH, help="responses per rollout")
    p.add_argument("--minibatch", type=int, default=MINIBATCH, help="responses per optimizer step")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="passes over each rollout")
    p.add_argument("--response-length", type=int, default=RESPONSE_LENGTH, help="new tokens per response at most")
    p.add_argument("--eval-episodes", type=int, default=EVAL_EPISODES, help="held-out prompts scored afterwards")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 1..SEEDS for every trainer")
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"), help="where trl_compare.md/.json go")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set OMP_NUM_THREADS for every trainer (default: inherit); 1 is far faster on a busy machine",
    )
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md's TRL region")
    p.add_argument("--worker", choices=TRAINERS[1:], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure(args)
    if args.worker:
        worker(args.worker, args.updates, args.seed, args.out)
        return 0
    import run as bench

    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = set(trainers) - set(TRAINERS)
    sizes = (args.updates, args.seeds, args.batch, args.minibatch, args.epochs, args.response_length)
    if unknown or min(sizes) <= 0 or args.batch % args.minibatch:
        raise SystemExit(
            f"error: unknown trainers {sorted(unknown)} (known: {', '.join(TRAINERS)}), a non-positive "
            f"--updates/--seeds/--batch/--minibatch/--epochs/--response-length, or --minibatch not dividing --batch"
        )
    if any(t != "ppo.py" for t in trainers):
        try:
            import trl  # noqa: F401 (imported only to check that it is installed)
        except ImportError as error:
            raise SystemExit("error: TRL is not installed: pip install --no-deps -r requirements-bench.txt") from error
    results_dir = os.path.abspath(args.results_dir)
    run_root = os.path.join(results_dir, "runs", "trl_compare")
    os.makedirs(run_root, exist_ok=True)
    command = "python benchmarks/trl_compare.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    machine_before = bench.machine_line()
    print(
        f"trl_compare: {', '.join(trainers)} x seeds 1-{args.seeds}, {args.updates} updates; {machine_before}",
        flush=True,
    )
    env = {**bench.child_env(args.threads), **OFFLINE}
    results = []
    for seed in range(1, args.seeds + 1):
        for name in trainers:
            log = os.path.join(run_root, f"{name}__{seed}.log")
            print(f"  {name} seed {seed} ...", end=" ", flush=True)
            if name == "ppo.py":
                r = ours(bench, args.updates, seed, run_root, log, bench.child_env(args.threads))
            else:
                out = os.path.join(run_root, f"{name}__{seed}.json")
                if os.path.exists(out):
                    os.remove(out)
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    name,
                    "--updates",
                    str(args.updates),
                    "--seed",
                    str(seed),
                    "--out",
                    out,
                    *work_flags(args),
                ]
                r = bench.run_child(cmd, log, env=env)
                if r["returncode"] == 0 and os.path.exists(out):
                    with open(out) as f:
                        r = {**r, **json.load(f)}
                else:
                    r = {**r, "trainer": name, "seed": seed, "error": bench.last_line(log)}
            r.setdefault("trainer", name)
            results.append(r)
            print(
                f"FAILED: {r['error']}"
                if "error" in r
                else f"{r['samples'] / r['train_seconds']:.1f} samples/s, "
                f"return {r['final']['eval/return_mean']:+.3f}, {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    initials = [r["initial"]["eval/return_mean"] for r in results if r["trainer"] == "ppo.py" and "initial" in r]
    initial = sum(initials) / len(initials) if initials else None
    machine_after = bench.machine_line()
    versions = next((r["versions"] for r in results if "versions" in r), {})
    table = comparison_table(results, initial)
    failed = [f"- {r['trainer']} seed {r['seed']}: {r['error']}" for r in results if "error" in r]
    body = "\n\n".join(
        x
        for x in [
            f"`{command}` ({time.strftime('%Y-%m-%d')}; {machine_before.split(', 1/5/15')[0]}; "
            f"TRL {versions.get('trl', '?')}, transformers {versions.get('transformers', '?')}; "
            f"{bench.threads_text(args.threads)}; "
            f"load before/after: {machine_before.split('load ')[-1]} / {machine_after.split('load ')[-1]}; "
            f"seeds 1-{args.seeds}, {args.updates} updates of {BATCH} responses of at most {RESPONSE_LENGTH} tokens, "
            f"model {MODEL}):",
            table,
            (f"Every policy starts at held-out return {initial:+.3f}. " if initial is not None else "")
            + "Ratios are trainer / `ppo.py`: above 1 means more samples per second, more gain in held-out return, "
            "or more memory. Peak RSS is the whole process, imports included (TRL also imports datasets, pyarrow, "
            "pandas and accelerate).",
            "\n".join(failed),
        ]
        if x
    )
    with open(os.path.join(results_dir, "trl_compare.md"), "w") as f:
        f.write("# Side by side with TRL\n\n" + body + "\n")
    with open(os.path.join(results_dir, "trl_compare.json"), "w") as f:
        json.dump({"command": command, "machine": [machine_before, machine_after], "results": results}, f, indent=1)
    if not args.no_readme:
        bench.write_readme_region(body, START, END)
    print("\n" + body, flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
