"""Every command shown in README.md and docs/*.md works.

Each `python <script> ...` line of a fenced code block (backslash continuations joined, `# comments`
dropped) is run as a subprocess with a tiny budget appended (later flags override earlier ones), so a
documented command with a wrong flag, a renamed option or a broken default fails here.

Not run, only parsed (their flags must parse into the script's `Args`, or its argparse options):
- commands that need the network: a hub model (`--model-name gpt2`, any name that is neither a
  built-in model nor an existing directory) or a hub task (`--task imdb`, `--task jsonl`);
- `benchmarks/trl_compare.py`, which needs TRL (requirements-bench.txt), not part of the test install;
- `--resume <run dir>` commands: the run directory is the reader's own.

`torchrun ...` lines run as `python -m torch.distributed.run` with 2 CPU processes (gloo), unless they
need the network or several machines (`--nnodes`), which are parsed.

A documented program with no tiny budget here (TINY, OTHER, MODULES) fails the test with a message
saying where to add one: a new command in the docs needs a tiny budget to be covered.

`benchmarks/run.py` commands run for real, restricted to one tiny `ppo.py` run (`--only ppo.py
--seeds 1`) writing to a temporary directory, without touching README.md or docs/results.md. matplotlib is
optional there.

Commands run two at a time with one intra-op thread each (the machine has 2 cores). The method scripts'
commands run in two batches, one interpreter each (tests/docs_runner.py), so that torch and transformers are
imported twice rather than once per command.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import TINY_FLAGS, TORCHRUN_2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]

# A tiny budget per script (tests/helpers.py): appended to the documented command, so it overrides the same
# flags there.
TINY = TINY_FLAGS
METHOD_COMMON = ["--no-save-model"]
# Other documented programs: how to make each tiny (given a temporary directory).
OTHER = {
    # the tiny model, without compiling (tens of seconds on the CPU): the --compile path is not run here
    "benchmarks/ppo_step.py": lambda tmp: [
        "--model-name",
        "tiny-gpt2",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--no-compile",
    ],
    "benchmarks/reward_lm_tabular.py": lambda tmp: ["--seeds", "1", "--budgets", "64:16"],
    # the GPT-2-small-shaped model's commands run on a 1-layer, 64-wide model of a 2,000-token vocabulary
    "benchmarks/gpt2_small.py": lambda tmp: [
        *("--out", os.path.join(tmp, "gpt2-small-shape"), "--layers", "1", "--width", "64", "--vocab", "2000")
    ],
    "benchmarks/ppo_phases.py": lambda tmp: [
        *("--model-name", "tiny-gpt2", "--updates", "1", "--rollout-batch-size", "8", "--minibatch-size", "8"),
        *("--response-length", "8", "--ppo-epochs", "1", "--output-dir", os.path.join(tmp, "runs")),
        *("--json", os.path.join(tmp, "phases.json"), "--page", os.path.join(tmp, "phases.md")),
    ],
    "benchmarks/cost_curve.py": lambda tmp: [
        *("--models", "tiny-gpt2", "--lengths", "4", "--results", os.path.join(tmp, "cost.json")),
        *("--page", os.path.join(tmp, "cost.md"), "--figure", os.path.join(tmp, "cost.png")),
        *("--rollout-batch-size", "8", "--minibatch-size", "8", "--ppo-epochs", "1"),
        *("--output-dir", os.path.join(tmp, "runs")),
    ],
    "benchmarks/ddp_sync.py": lambda tmp: [
        *("--model-name", "tiny-gpt2", "--batch", "2", "--steps", "1", "--rounds", "1", "--no-cuda")
    ],
    "benchmarks/generation.py": lambda tmp: [
        *("--model-name", "tiny-gpt2", "--batch", "4", "--length", "4", "--repeats", "1")
    ],
    "benchmarks/ilql_wordle.py": lambda tmp: [
        "--seeds",
        "1",
        "--datasets",
        "per_move",
        "--methods",
        "bc",
        "ilql",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-episodes",
        "8",
        "--output-dir",
        os.path.join(tmp, "ilql_wordle"),
        "--results",
        os.path.join(tmp, "ilql_wordle.json"),
        "--page",
        os.path.join(tmp, "ilql.md"),
        "--",
        "--batch-size",
        "4",
        "--wordle-games",
        "64",
    ],
}
OTHER["benchmarks/alol_variants.py"] = lambda tmp: [
    "--seeds",
    "1",
    "--variants",
    "a_lol",
    "--output-dir",
    os.path.join(tmp, "alol_variants"),
    "--results",
    os.path.join(tmp, "alol.json"),
    "--page",
    os.path.join(tmp, "alol.md"),
    "--",
    *TINY["alol.py"],
]
OTHER["benchmarks/reward_lm_seeds.py"] = lambda tmp: [
    "--seeds",
    "101",
    "--agents",
    "ts",
    "--queries",
    "32",
    "--per-round",
    "16",
    "--output-dir",
    os.path.join(tmp, "reward_lm_seeds"),
    "--results",
    os.path.join(tmp, "reward_lm.json"),
    "--page",
    os.path.join(tmp, "reward_lm.md"),
    "--",
    *TINY["reward_lm.py"],
    "--queries",
    "32",
]
MODULES = {"common.wordle": ["20", "200"]}  # `python -m common.wordle [games] [words]`: positional, replaced
BUILTIN_MODELS = ("tiny-gpt2", "tiny-t5")
NETWORK_TASKS = ("imdb", "jsonl")  # jsonl: the documented prompts file and reward are the reader's own


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `python ...` line inside a fenced code block of the docs (README.md, docs/*.md,
    benchmarks/README.md and docs/notes/*.md)."""
    found = []
    notes = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "notes", "*.md")))
    for rel in [*DOCS, os.path.join("benchmarks", "README.md"), *notes]:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                try:
                    argv = shlex.split(line, comments=True)
                except ValueError:
                    continue
                if argv and argv[0] == "python" and len(argv) > 1 and (argv[1].endswith(".py") or argv[1] == "-m"):
                    found.append((rel, shlex.join(argv)))
                elif argv and argv[0] == "torchrun" and any(a.endswith(".py") for a in argv):
                    found.append((rel, shlex.join(argv)))
    return list(dict.fromkeys(found))


def flag_value(argv: list[str], flag: str):
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def needs_network(argv: list[str]) -> bool:
    model = flag_value(argv, "--model-name")
    if model is not None and model not in BUILTIN_MODELS and not os.path.isdir(os.path.join(ROOT, model)):
        return True
    return flag_value(argv, "--task") in NETWORK_TASKS


def plan(command: str, tmp: str) -> tuple[str, list[str]]:
    """("run", argv with the tiny budget) or ("parse", argv) for a documented command."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        script, flags = argv[at], argv[at + 1 :]
        if script in OTHER:  # a benchmark program: its own tiny arguments
            return "run", [*TORCHRUN_2, script, *flags, *OTHER[script](tmp)]
        if needs_network(flags) or "--nnodes" in argv or "--resume" in flags:
            return "parse", [script, *flags]
        return "run", [
            *TORCHRUN_2,
            script,
            *flags,
            *TINY[script],
            *METHOD_COMMON,
            "--output-dir",
            os.path.join(tmp, "runs"),
        ]
    argv = argv[1:]  # drop "python"
    if argv[0] == "-m":
        if argv[1] not in MODULES:
            raise AssertionError(f"python -m {argv[1]}: add its tiny arguments to MODULES in tests/test_docs.py")
        return "run", ["-m", argv[1], *MODULES[argv[1]]]
    script, flags = argv[0], argv[1:]
    if "--help" in flags or "-h" in flags:
        return "run", [script, *flags]
    if script == "benchmarks/trl_compare.py":
        return "parse", argv
    if script == "benchmarks/run.py":
        extra = " ".join(TINY["ppo.py"] + METHOD_COMMON)
        return "run", [
            script,
            *flags,
            "--only",
            "ppo.py",
            "--seeds",
            "1",
            "--no-readme",
            "--results-dir",
            os.path.join(tmp, "bench"),
            "--page",
            os.path.join(tmp, "results.md"),
            f"--extra={extra}",
        ]
    if script in OTHER:
        return "run", [script, *flags, *OTHER[script](tmp)]
    if script not in TINY:
        raise AssertionError(f"{script}: add a tiny budget for it to TINY in tests/test_docs.py")
    if needs_network(flags) or "--resume" in flags:
        return "parse", argv
    return "run", [script, *flags, *TINY[script], *METHOD_COMMON, "--output-dir", os.path.join(tmp, "runs")]


def effective_run(argv: list[str]) -> tuple:
    """What a planned command runs: the program, then each flag at its last value (tyro and argparse keep the last
    occurrence; `--no-x` is `--x` off), so commands whose documented flags the tiny budget overrides alike are one
    run. Only the program's own flags are read: torchrun's before it and a benchmark's pass-through after `--` stay
    as they are."""
    at = next((i for i, a in enumerate(argv) if a.endswith(".py")), len(argv) - 1) + 1
    head, rest = argv[:at], argv[at:]
    tail = rest[rest.index("--") :] if "--" in rest else []
    flags, name = {}, None
    for a in rest[: len(rest) - len(tail)]:
        if a.startswith("--"):
            name, has_value, value = a[2:].partition("=")
            if name.startswith("no-"):
                name = name[3:]
                flags[name] = (False,)
            else:
                flags[name] = (value,) if has_value else (True,)
        elif name is not None:  # a value of the flag before it (tuple flags take several)
            flags[name] = (*[v for v in flags[name] if v is not True], a)
        else:
            head.append(a)
    return (*head, *sorted(flags.items()), *tail)


def parse_only(argv: list[str]) -> None:
    """The flags parse: into the method's tyro `Args`, or the benchmark script's argparse options."""
    script, flags = argv[0], argv[1:]
    if script.startswith("benchmarks/"):
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        module = importlib.import_module(os.path.basename(script)[:-3])
        module.parse_args(flags)
        return
    import tyro

    module = importlib.import_module(script[:-3])
    tyro.cli(module.Args, args=flags)


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every runnable command once, two at a time, before the per-command checks read the results."""
    jobs, same_run = {}, {}  # same_run: a command whose tiny run is another's, but for its temporary directory
    first_with = {}
    for i, (_, command) in enumerate(COMMANDS):
        kind, argv = plan(command, str(tmp_path_factory.mktemp(f"cmd{i}")))
        if kind != "run":
            continue
        key = effective_run(plan(command, "<tmp>")[1])
        if key in first_with:  # `python ppo.py` on two pages, or commands whose flags the budget overrides alike
            same_run[command] = first_with[key]
        else:
            first_with[key] = command
            jobs[command] = argv

    # Two commands share the 2 cores, so each gets one intra-op thread: two 2-thread torch processes on
    # 2 cores spend most of their time waiting on each other's OpenMP barriers (many times slower).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(argv):
        return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)

    # The method scripts' commands run in two batches, one interpreter each (tests/docs_runner.py: each command
    # as `python <script>` would, but torch and transformers imported once per batch); torchrun, `-m` and the
    # benchmark programs, which start processes of their own, each in a process of its own.
    in_batch = [c for c, argv in jobs.items() if argv[0] in TINY_FLAGS]
    batches = [in_batch[0::2], in_batch[1::2]]

    def run_batch(commands):
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tests", "docs_runner.py")],
            cwd=ROOT,
            input=json.dumps([jobs[c] for c in commands]),
            capture_output=True,
            text=True,
            timeout=1200,
            env=env,
        )
        if done.returncode != 0:  # the interpreter itself died: every command of the batch failed with it
            return {
                c: subprocess.CompletedProcess(jobs[c], done.returncode, done.stdout, done.stderr) for c in commands
            }
        return {
            c: subprocess.CompletedProcess(jobs[c], r["returncode"], r["stdout"], r["stderr"])
            for c, r in zip(commands, json.loads(done.stdout), strict=True)
        }

    with ThreadPoolExecutor(max_workers=2) as pool:
        batch_futures = [pool.submit(run_batch, batch) for batch in batches if batch]
        futures = {command: pool.submit(run, argv) for command, argv in jobs.items() if command not in in_batch}
        results = {command: (jobs[command], future.result()) for command, future in futures.items()}
        for future in batch_futures:
            results.update({command: (jobs[command], result) for command, result in future.result().items()})
        results.update({command: results[first] for command, first in same_run.items()})
        return results


def test_docs_show_commands():
    scripts = {shlex.split(c)[1] for _, c in COMMANDS}
    assert COMMANDS, "no `python ...` command found in README.md or docs/*.md code blocks"
    assert "ppo.py" in scripts and "benchmarks/run.py" in scripts, scripts


@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}: {c}" for s, c in COMMANDS])
def test_documented_command(source, command, results, tmp_path):
    kind, argv = plan(command, str(tmp_path))
    if kind == "parse":
        parse_only(argv)
        return
    argv, result = results[command]
    assert result.returncode == 0, (
        f"{source}: `{command}` failed as `python {shlex.join(argv)}`:\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )


def test_plan_overrides_budget_and_spots_network_commands(tmp_path):
    kind, argv = plan("python ppo.py --total-updates 100", str(tmp_path))
    assert kind == "run" and argv[-1] == os.path.join(str(tmp_path), "runs")
    assert argv.index("--total-updates") < len(argv) - argv[::-1].index("--total-updates") - 1  # tiny one comes last
    assert plan("python ppo.py --model-name gpt2", str(tmp_path))[0] == "parse"
    assert plan("python ppo.py --model-name tiny-t5", str(tmp_path))[0] == "run"
    assert plan("python ppo.py --task imdb --model-name lvwerra/gpt2-imdb", str(tmp_path))[0] == "parse"
    assert plan("python ppo.py --task jsonl --prompts-file p.jsonl --reward-fn m:f", str(tmp_path))[0] == "parse"
    assert plan("python benchmarks/trl_compare.py", str(tmp_path))[0] == "parse"
    assert plan("python ppo.py --resume runs/x", str(tmp_path))[0] == "parse"
    kind, argv = plan("torchrun --nproc_per_node 8 ppo.py --rollout-batch-size 128", str(tmp_path))
    assert kind == "run" and argv[:5] == TORCHRUN_2
    assert plan("torchrun --nnodes 2 --nproc_per_node 8 ppo.py", str(tmp_path)) == ("parse", ["ppo.py"])


def test_effective_run_reads_the_last_value_of_each_flag(tmp_path):
    """Commands the tiny budget overrides alike are one run, and no others."""

    def same(a: str, b: str) -> bool:
        return effective_run(plan(a, "<tmp>")[1]) == effective_run(plan(b, "<tmp>")[1])

    assert same("python ppo.py --total-updates 100", "python ppo.py")  # the budget sets --total-updates
    assert not same("python ppo.py --model-name tiny-t5", "python ppo.py")
    assert not same("python ppo.py --temperature=0.7", "python ppo.py --temperature 0.8")
    assert same("python ppo.py --save-model", "python ppo.py")  # the budget's --no-save-model comes last
    assert not same("python reward_lm.py --agents ts greedy", "python reward_lm.py --agents ts")
    assert same("python benchmarks/ppo_step.py --compile", "python benchmarks/ppo_step.py")  # --no-compile last
    assert not same("python benchmarks/ppo_step.py --vocab 50257", "python benchmarks/ppo_step.py")
    assert same(
        "torchrun --nproc_per_node 2 benchmarks/ddp_sync.py --rounds 7 --steps 8",
        "torchrun --nproc_per_node 2 benchmarks/ddp_sync.py --model-name runs/gpt2-small-shape --batch 4",
    )


def test_tyro_takes_the_last_occurrence_of_a_flag():
    """The tiny budget works by appending flags; that relies on the last occurrence winning."""
    import tyro

    import ppo

    args = tyro.cli(ppo.Args, args=["--total-updates", "100", "--total-updates", "1"])
    assert args.total_updates == 1
