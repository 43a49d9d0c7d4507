"""Helpers shared by the script tests (pytest puts tests/ on sys.path)."""

import ast

# What every evaluation of a single-turn task reports on the embedded sentiment task (common/tasks.py evaluate)
SENTIMENT_EVAL_KEYS = {
    "eval/return_mean",
    "eval/return_std",
    "eval/perplexity",
    "eval/ref_nll",
    "eval/grammatical",
    "eval/distinct_1",
    "eval/distinct_2",
    "eval/unique_1",
    "eval/unique_2",
    "eval/msttr",
    "eval/entropy_1",
    "eval/entropy_2",
    "eval/response_length",
}

# A tiny budget per script, a few seconds of work: the documented commands (test_docs) and the copied scripts
# (test_copy) run with it
TINY_FLAGS = {
    "ppo.py": [
        "--total-updates",
        "1",
        "--rollout-batch-size",
        "4",
        "--minibatch-size",
        "2",
        "--ppo-epochs",
        "1",
        "--eval-episodes",
        "4",
        "--eval-every",
        "1",
    ],
    "ilql.py": [
        "--total-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-episodes",
        "4",
        "--eval-every",
        "2",
        "--wordle-games",
        "64",
        "--print-every",
        "1",
    ],
    "alol.py": [
        "--total-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-episodes",
        "4",
        "--eval-every",
        "2",
        "--offline-size",
        "64",
        "--value-prompts",
        "16",
        "--value-epochs",
        "1",
        "--forward-batch-size",
        "16",
    ],
    "reward_lm.py": [
        "--num-seeds",
        "1",
        "--queries",
        "32",
        "--queries-per-round",
        "16",
        "--pretrain-size",
        "512",
        "--pretrain-epochs",
        "1",
        "--max-fit-steps",
        "2",
        "--ensemble-size",
        "2",
        "--progress-every",
        "1",
    ],
}
# nlpo.py is ppo.py plus the masking policy: the same budget, its mask refreshed every update
TINY_FLAGS["nlpo.py"] = [*TINY_FLAGS["ppo.py"], "--mask-update-every", "1"]

# `python` + these = torchrun with 2 CPU processes (gloo); --standalone picks a free port for the rendezvous
TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def args_fields(path: str, class_name: str) -> list[tuple[str, bool]]:
    """(field, has a docstring of at least two words) for every field of a dataclass, read from the
    source: tyro turns those docstrings into the --help text, so a missing one is an undocumented flag."""
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out = []
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign):
            nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
            doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            out.append((node.target.id, doc and len(nxt.value.value.split()) >= 2))
    return out


def scalars(run_root: str) -> dict[str, list[float]]:
    """Every TensorBoard scalar of the single run directory under `run_root`, in step order."""
    import glob
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(os.path.join(run_root, "*"))
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {key: [e.value for e in events.Scalars(key)] for key in events.Tags()["scalars"]}
