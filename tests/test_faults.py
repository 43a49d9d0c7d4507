"""Bad input and faults, for every script (issue 17): what a user can get wrong, and what the machine can do to a run.

- `test_bad_input_and_faults_stop_with_one_line`: one table of command lines, every script's real CLI (run in one
  Python process by tests/cli_batch.py, so the table costs one interpreter start-up): each stops with exit code 1 and
  one `error:` line naming the cause, no traceback, within 30 s, and leaves nothing half-written: a refused run
  leaves no run directory at all, a run stopped by a fault keeps its last checkpoint and writes no summary.
- prompt files shorter than a batch and prompts longer than the model's context run (wrap around, cut to fit);
- a run killed while it writes a checkpoint resumes from the checkpoint before; a checkpoint write that fails
  (a full disk) stops with one line and keeps the previous checkpoint;
- alol.py resumed logs each epoch of the value head's fit once in TensorBoard.
"""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SCRIPTS = ("ppo.py", "nlpo.py", "alol.py", "ilql.py", "reward_lm.py")
CASE_SECONDS = 30  # the most one bad command line may take to say what is wrong

# Tiny budgets with a checkpoint after every update/step, and (ppo, nlpo, alol) your own prompts and reward
# (--reward-fn is appended per case).
TINY = {
    "ppo.py": "--total-updates 3 --rollout-batch-size 4 --minibatch-size 4 --ppo-epochs 1 --eval-episodes 4 "
    "--response-length 8 --checkpoint-every 1 --no-save-model",
    "alol.py": "--total-steps 3 --batch-size 4 --offline-size 32 --value-prompts 8 --value-epochs 1 --eval-every 1 "
    "--eval-episodes 4 --forward-batch-size 8 --response-length 8 --checkpoint-every 1 --no-save-model",
}
TINY["nlpo.py"] = TINY["ppo.py"]
JSONL = "--task jsonl --prompts-file {d}/prompts.jsonl --model-name {model}"

# The user's reward functions (file.py:function specs load the file afresh for every case, so `calls` restarts).
REWARDS = '''calls = 0


def words(prompts, responses):
    return [len(r) / 10 for r in responses]


def boom(prompts, responses):
    raise ValueError("boom")


def strings(prompts, responses):
    return ["good" for _ in responses]


def _fails_after(n, fail):
    """Scores until call n (the start-up check is call 1), then `fail`s."""
    def reward(prompts, responses):
        global calls
        calls += 1
        return fail(responses) if calls > n else [len(r) / 10 for r in responses]
    return reward


def _server_down(responses):
    raise ValueError("the reward server is down")


def _nan(responses):
    return [float("nan")] * len(responses)


def slow(prompts, responses):  # a remote reward: every update takes a second
    import time

    time.sleep(1)
    return [len(r) / 10 for r in responses]


nan_after_1 = _fails_after(1, _nan)
nan_after_3 = _fails_after(3, _nan)
raise_after_1 = _fails_after(1, _server_down)
raise_after_3 = _fails_after(3, _server_down)
raise_after_4 = _fails_after(4, _server_down)
'''

# (case, script, flags, what the one line must say, outcome): outcome "refused" = nothing is written (no run
# directory); "stopped" = a fault during the run: its directory holds no summary and no checkpoint; "stopped@N" =
# the same with the checkpoint of update (step) N intact. {d}: the data directory, {model}: the built-in tiny GPT-2.
CASES = [
    # numbers, checked before anything loads
    *[
        ("learning rate -1", s, "--learning-rate -1", "--learning-rate must be positive, got -1.0", "refused")
        for s in SCRIPTS
    ],
    *[
        ("learning rate nan", s, "--learning-rate nan", "--learning-rate must be positive, got nan", "refused")
        for s in ("ppo.py", "alol.py", "ilql.py")
    ],
    ("learning rate inf", "nlpo.py", "--learning-rate inf", "--learning-rate must be positive, got inf", "refused"),
    *[
        ("temperature 0", s, "--temperature 0", "--temperature must be positive, got 0.0", "refused")
        for s in ("ppo.py", "nlpo.py", "ilql.py")
    ],
    ("negative temperature", "ppo.py", "--temperature -0.5", "--temperature must be positive", "refused"),
    *[
        ("negative clip range", s, "--clip-range -0.2", "--clip-range must be positive", "refused")
        for s in ("ppo.py", "nlpo.py")
    ],
    ("negative clip range", "alol.py", "--clip-eps -0.5", "--clip-eps must be in (0, 1)", "refused"),
    ("top-p above 1", "ppo.py", "--top-p 1.5", "--top-p must be in (0, 1]", "refused"),
    ("gamma above 1", "ppo.py", "--gamma 1.5", "--gamma must be in [0, 1]", "refused"),
    ("negative seed", "nlpo.py", "--seed -1", "--seed must be in [0, 4294967295]", "refused"),
    ("zero batch", "ppo.py", "--rollout-batch-size 0", "--rollout-batch-size must be positive", "refused"),
    ("zero batch", "ilql.py", "--batch-size 0", "--batch-size must be positive", "refused"),
    ("zero eval episodes", "alol.py", "--eval-episodes 0", "--eval-episodes must be positive", "refused"),
    ("nan clip", "ilql.py", "--adv-clip nan", "--adv-clip must be in (-inf, inf]", "refused"),
    ("negative beta", "reward_lm.py", "--beta -1", "--beta must be non-negative", "refused"),
    ("heads not dividing the width", "reward_lm.py", "--n-head 3", "--n-head 3 must divide --n-embd 64", "refused"),
    # where the run would be written
    *[
        ("output dir under a file", s, "--output-dir {d}/afile/runs", "afile is a file, not a directory", "refused")
        for s in SCRIPTS
    ],
    ("output dir is a file", "ppo.py", "--output-dir {d}/afile", "afile is a file, not a directory", "refused"),
    ("output dir in /proc", "ppo.py", "--output-dir /proc/lmrl-runs", "/proc/lmrl-runs", "refused"),
    # --resume of what is not this script's checkpoint
    *[
        (
            "resume a truncated checkpoint",
            s,
            "--resume {d}/truncated",
            "state.pt is damaged or not a checkpoint",
            "refused",
        )
        for s in SCRIPTS
    ],
    ("resume random bytes", "ppo.py", "--resume {d}/random", "is damaged or not a checkpoint", "refused"),
    ("resume an empty file", "ppo.py", "--resume {d}/empty", "is damaged or not a checkpoint (EOFError", "refused"),
    (
        "resume a pickle that is no checkpoint",
        "nlpo.py",
        "--resume {d}/a-list",
        "is not a checkpoint of these scripts",
        "refused",
    ),
    *[
        (
            "resume another script's run",
            s,
            f"--resume {{d}}/{other}",
            f"the checkpoint was written by {other}, not {s}",
            "refused",
        )
        for s, other in (
            ("ppo.py", "alol.py"),
            ("nlpo.py", "ppo.py"),
            ("alol.py", "ppo.py"),
            ("ilql.py", "alol.py"),
            ("reward_lm.py", "ilql.py"),
        )
    ],
    (
        "resume another script's older run",
        "ppo.py",
        "--resume {d}/older-alol",
        "the checkpoint was written by another script, not ppo.py",
        "refused",
    ),
    ("resume a file", "ilql.py", "--resume {d}/afile", "no checkpoint at", "refused"),
    # prompts and models
    *[
        (
            "prompts file is a directory",
            s,
            JSONL.replace("prompts.jsonl", "") + " --reward-fn {d}/rewards.py:words",
            "is a directory, not a JSONL file",
            "refused",
        )
        for s in ("ppo.py", "alol.py")
    ],
    (
        "prompts file not UTF-8",
        "ppo.py",
        JSONL.replace("prompts.jsonl", "latin1.jsonl") + " --reward-fn {d}/rewards.py:words",
        "latin1.jsonl:2: not UTF-8 text",
        "refused",
    ),
    ("model path is a file", "ppo.py", "--model-name {d}/afile", "is a file; pass the directory", "refused"),
    ("model directory without a model", "alol.py", "--model-name {d}/emptydir", "has no config.json", "refused"),
    (
        "response longer than the context",
        "ppo.py",
        "--response-length 200",
        "--response-length 200 leaves no room for a prompt in the model's 128 positions",
        "refused",
    ),
    # the user's reward: before training it is bad input; during training a fault that names the update
    *[
        (
            "reward raises at the start-up check",
            s,
            JSONL + " --reward-fn {d}/rewards.py:boom",
            "--reward-fn {d}/rewards.py:boom raised ValueError: boom (rewards.py, line 9)",
            "refused",
        )
        for s in ("ppo.py", "nlpo.py", "alol.py")
    ],
    (
        "reward returns strings",
        "nlpo.py",
        JSONL + " --reward-fn {d}/rewards.py:strings",
        "the reward function returned ['good', 'good']; expected 2 finite floats",
        "refused",
    ),
    (
        "reward module does not parse",
        "ppo.py",
        JSONL + " --reward-fn {d}/broken.py:score",
        "importing '{d}/broken.py' raised SyntaxError: ",
        "refused",
    ),
    (
        "reward module raises on import",
        "alol.py",
        JSONL + " --reward-fn {d}/needs_a_key.py:score",
        "raised KeyError: 'REWARD_API_KEY' (needs_a_key.py, line 2)",
        "refused",
    ),
    *[
        (
            "NaN reward in the first evaluation",
            s,
            JSONL + " " + TINY[s] + " --reward-fn {d}/rewards.py:nan_after_1",
            "the reward function returned [nan, nan, nan, nan]; expected 4 finite floats "
            "(at update 0, before training)",
            "stopped",
        )
        for s in ("ppo.py", "nlpo.py")
    ],
    *[
        (
            "reward raises mid-run",
            s,
            JSONL + " " + TINY[s] + " --reward-fn {d}/rewards.py:raise_after_3",
            "raised ValueError: the reward server is down (rewards.py, line 26) (at update 2); the last checkpoint",
            "stopped@1",
        )
        for s in ("ppo.py", "nlpo.py")
    ],
    (
        "NaN reward mid-run",
        "ppo.py",
        JSONL + " " + TINY["ppo.py"] + " --reward-fn {d}/rewards.py:nan_after_3",
        "expected 4 finite floats (at update 2); the last checkpoint",
        "stopped@1",
    ),
    (
        "reward raises on the offline samples",
        "alol.py",
        JSONL + " " + TINY["alol.py"] + " --reward-fn {d}/rewards.py:raise_after_1",
        "the reward server is down (rewards.py, line 26) (at step 0, before training)",
        "stopped",
    ),
    (
        "NaN reward in the first evaluation",
        "alol.py",
        JSONL + " " + TINY["alol.py"] + " --reward-fn {d}/rewards.py:nan_after_3",
        "finite floats (at step 0, before training)",
        "stopped",
    ),
    (
        "reward raises mid-run",
        "alol.py",
        JSONL + " " + TINY["alol.py"] + " --reward-fn {d}/rewards.py:raise_after_4",
        "the reward server is down (rewards.py, line 26) (at step 1)",
        "stopped@0",
    ),
    # the machine: a full disk (files may not grow past 200 kB) when the first checkpoint is written
    (
        "disk full while checkpointing",
        "ppo.py",
        TINY["ppo.py"] + " --fsize-limit 200000",
        "cannot write {out}/state.pt: File too large (at update 1)",
        "stopped",
    ),
    (
        "disk full while checkpointing",
        "alol.py",
        TINY["alol.py"] + " --fsize-limit 200000",
        "cannot write {out}/state.pt: File too large (at step 0, before training)",
        "stopped",
    ),
]
if os.geteuid() != 0:  # root may write anywhere
    CASES += [
        ("read-only output dir", s, "--output-dir {d}/read-only/runs", "no permission to write in", "refused")
        for s in ("ppo.py", "alol.py")
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The files the cases read: prompts, reward modules, damaged and foreign checkpoints, a plain file."""
    from common.builtin_models import ensure_builtin_model
    from common.tasks import make_task

    d = tmp_path_factory.mktemp("data")
    (d / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"the film was {i} times", "split": "eval" if i < 4 else "train"}) + "\n"
            for i in range(12)
        )
    )
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "the film"}\n{"prompt": "caf\xe9"}\n')
    (d / "rewards.py").write_text(REWARDS)
    (d / "broken.py").write_text("def score(prompts, responses)\n    return 1\n")
    (d / "needs_a_key.py").write_text("import os\nKEY = os.environ['REWARD_API_KEY']\n")
    (d / "afile").write_text("not a directory\n")
    (d / "emptydir").mkdir()
    read_only = d / "read-only"
    read_only.mkdir(mode=0o555)
    checkpoint = {"step": 1, "args": {"seed": 1}, "run": {"evals": [], "tokens": 0, "wall_seconds": 0.0}, "rng": []}
    for name, content in [
        ("ppo.py", {**checkpoint, "script": "ppo.py"}),
        ("alol.py", {**checkpoint, "script": "alol.py"}),
        ("ilql.py", {**checkpoint, "script": "ilql.py"}),
        ("older-alol", {**checkpoint, "args": {"seed": 1, "algorithm": "a_lol"}}),
        ("a-list", [1, 2, 3]),
    ]:
        os.makedirs(d / name / "checkpoint")
        torch.save(content, d / name / "checkpoint" / "state.pt")
    whole = (d / "ppo.py" / "checkpoint" / "state.pt").read_bytes()
    for name, content in [
        ("truncated", whole[: len(whole) // 2]),
        ("empty", b""),
        (
            "random",
            bytes(
                torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist()
            ),
        ),
    ]:
        os.makedirs(d / name / "checkpoint")
        (d / name / "checkpoint" / "state.pt").write_bytes(content)
    yield {"d": str(d), "model": ensure_builtin_model(make_task("sentiment"), "tiny-gpt2")}
    read_only.chmod(0o755)


def run_batch(cases: list[dict], tmp_path) -> list[dict]:
    """Every case's command line in one Python process (tests/cli_batch.py)."""
    with open(tmp_path / "cases.json", "w") as f:
        json.dump(cases, f)
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "cli_batch.py"),
            str(tmp_path / "cases.json"),
            str(tmp_path / "results.json"),
        ],
        cwd=ROOT,
        env=ENV,
        check=True,
        timeout=600,
    )
    with open(tmp_path / "results.json") as f:
        return json.load(f)


def files_under(path) -> list[str]:
    return [os.path.join(parent, name) for parent, dirs, names in os.walk(path) for name in dirs + names]


def test_bad_input_and_faults_stop_with_one_line(data, tmp_path):
    batch = []
    for i, (_case, script, flags, _expected, _outcome) in enumerate(CASES):
        out = str(tmp_path / f"case{i}")
        argv = shlex.split(flags.format(**data))
        fsize_limit = None
        if "--fsize-limit" in argv:
            at = argv.index("--fsize-limit")
            fsize_limit, argv = int(argv[at + 1]), argv[:at] + argv[at + 2 :]
        if "--output-dir" not in argv and "--resume" not in argv:
            argv += ["--output-dir", out]
        batch.append(
            {"script": script, "argv": argv, "cwd": data["d"], "fsize_limit": fsize_limit, "timeout": CASE_SECONDS + 15}
        )
    results = run_batch(batch, tmp_path)

    failures = []
    for i, ((case, script, flags, expected, outcome), result) in enumerate(zip(CASES, results, strict=True)):
        out = str(tmp_path / f"case{i}")
        lines = result["stderr"].strip().splitlines()
        run_dirs = glob.glob(os.path.join(out, "*"))
        expected = expected.format(**data, out=os.path.join(run_dirs[0] if run_dirs else out, "checkpoint"))
        problems = []
        if result["code"] != 1:
            problems.append(f"exit code {result['code']}")
        if len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0]:
            problems.append(f"stderr is not one line with {expected!r}")
        if "Traceback" in result["stdout"] + result["stderr"]:
            problems.append("a traceback")
        if result["seconds"] > CASE_SECONDS:
            problems.append(f"took {result['seconds']:.0f}s")
        if outcome == "refused" and run_dirs:
            problems.append(f"wrote {files_under(out)}")
        if outcome.startswith("stopped"):
            left = files_under(out)
            checkpoints = [f for f in left if f.endswith(os.path.join("checkpoint", "state.pt"))]
            if len(run_dirs) != 1 or any(f.endswith((".tmp", "summary.json")) or "model" in f for f in left):
                problems.append(f"left {left}")
            step = int(outcome.partition("@")[2]) if "@" in outcome else None
            saved = [torch.load(f, weights_only=False) for f in checkpoints]
            if [(c["step"], c["script"]) for c in saved] != ([] if step is None else [(step, script)]):
                problems.append(f"checkpoints {[(c['step'], c['script']) for c in saved]}, expected step {step}")
        if problems:
            failures.append(
                f"{script} {case} ({flags}): {'; '.join(problems)}\n    stderr: "
                f"{result['stderr'][-1500:]!r}\n    stdout: {result['stdout'][-500:]!r}"
            )
    assert not failures, "\n".join(failures)


def test_short_prompt_files_wrap_around_and_long_prompts_are_cut_to_fit(data, tmp_path):
    """Two training prompts for a batch of 4 (ILQL: 4 games for a batch of 8) run, the prompts wrapping around; a
    2,000-character prompt keeps what fits the 128 positions of the built-in GPT-2 beside its 48 response tokens."""
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p, "split": s}) + "\n"
            for p, s in [
                *[(f"the film was {i} times", "eval") for i in range(4)],
                ("the plot was", "train"),
                ("the movie was great . " * 100, "train"),
            ]
        )
    )
    jsonl = [
        "--task",
        "jsonl",
        "--prompts-file",
        str(prompts),
        "--model-name",
        data["model"],
        "--reward-fn",
        f"{data['d']}/rewards.py:words",
        "--eval-episodes",
        "4",
        "--no-save-model",
    ]
    online = ["--total-updates", "2", "--rollout-batch-size", "4", "--minibatch-size", "4", "--ppo-epochs", "1"]
    cases = {
        "ppo.py": [*jsonl, *online],
        "nlpo.py": [*jsonl, *online],
        "alol.py": [*jsonl, "--total-steps", "2", "--batch-size", "4", "--value-prompts", "2", "--value-epochs", "1"],
        "ilql.py": [
            "--task",
            "wordle",
            "--wordle-games",
            "4",
            "--wordle-width",
            "32",
            "--batch-size",
            "8",
            "--total-steps",
            "2",
            "--eval-episodes",
            "4",
            "--print-every",
            "1",
            "--no-save-model",
        ],
    }
    results = run_batch(
        [
            {"script": script, "argv": [*argv, "--output-dir", str(tmp_path / script)], "cwd": data["d"]}
            for script, argv in cases.items()
        ],
        tmp_path,
    )
    note = "note: prompts longer than 80 tokens keep their last 80 (the model's 128 positions less 48 for the response)"
    for script, result in zip(cases, results, strict=True):
        assert result["code"] == 0 and "Traceback" not in result["stderr"], (script, result["stderr"][-3000:])
        assert ("update 2/2" if script in ("ppo.py", "nlpo.py") else "step 2/2") in result["stdout"], script
        if script != "ilql.py":
            assert result["stdout"].count(note) == 1, (script, result["stdout"][-3000:])
        assert os.path.isfile(glob.glob(str(tmp_path / script / "*" / "summary.json"))[0])


def test_a_run_killed_while_checkpointing_or_whose_disk_fills_keeps_the_last_checkpoint(data, tmp_path):
    """ppo.py checkpoints after every update. (1) Killed while it writes the checkpoint of update 2 (into a pipe the
    test reads a little of, so the write is caught half-way): the checkpoint of update 1 is intact. (2) Resumed
    with files limited to 200 kB (a full disk): the checkpoint of update 2 fails, the run stops with one line and
    update 1's stays. (3) Resumed again: it continues after update 1 and finishes, leaving no partial file."""
    flags = [
        "--task",
        "jsonl",
        "--prompts-file",
        f"{data['d']}/prompts.jsonl",
        "--model-name",
        data["model"],
        "--reward-fn",
        f"{data['d']}/rewards.py:slow",
        *shlex.split(TINY["ppo.py"]),
        "--total-updates",
        "4",
        "--output-dir",
        str(tmp_path),
    ]
    ppo = [sys.executable, os.path.join(ROOT, "ppo.py")]
    proc = subprocess.Popen([*ppo, *flags], cwd=data["d"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "*" / "checkpoint" / "state.pt")):  # update 1's; update 2 takes > 1 s
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    state = os.path.join(run_dir, "checkpoint", "state.pt")
    os.mkfifo(state + ".tmp")  # where the checkpoint of update 2 will be written
    pipe, got = os.open(state + ".tmp", os.O_RDONLY | os.O_NONBLOCK), b""
    while len(got) < 10_000:  # the write has begun; the pipe fills and the writer blocks half-way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        try:
            got += os.read(pipe, 4096)
        except BlockingIOError:
            time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    os.close(pipe)
    assert torch.load(state, weights_only=False)["step"] == 1

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))

    full = subprocess.run(
        [*ppo, "--resume", run_dir],
        cwd=data["d"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=full_disk,
    )
    assert full.returncode == 1 and full.stderr.strip().splitlines() == [
        f"error: cannot write {state}: File too large (at update 2); the last checkpoint (if any) is kept in "
        f"{run_dir}/checkpoint"
    ], full.stderr[-3000:]
    assert torch.load(state, weights_only=False)["step"] == 1 and not os.path.lexists(state + ".tmp")

    resumed = subprocess.run(
        [*ppo, "--resume", run_dir], cwd=data["d"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run_dir} after update 1" in resumed.stdout and "update 4/4" in resumed.stdout
    assert torch.load(state, weights_only=False)["step"] == 3
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    assert not [f for f in files_under(run_dir) if f.endswith(".tmp")]


def test_alol_resumed_logs_each_value_epoch_once(tmp_path):
    """The value head's fit (epochs 1-3) is logged before step 1; resumed from the checkpoint of step 2, alol.py
    writes again only what TensorBoard dropped after it (`purge_step`), so each epoch keeps one point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = [
        "--total-steps",
        "4",
        "--batch-size",
        "4",
        "--offline-size",
        "64",
        "--value-prompts",
        "8",
        "--value-epochs",
        "3",
        "--value-patience",
        "3",
        "--eval-every",
        "2",
        "--eval-episodes",
        "4",
        "--forward-batch-size",
        "8",
        "--response-length",
        "8",
        "--checkpoint-every",
        "2",
        "--no-save-model",
    ]
    alol = [sys.executable, os.path.join(ROOT, "alol.py")]
    first = subprocess.run(
        [*alol, *flags, "--output-dir", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    resumed = subprocess.run(
        [*alol, "--resume", run_dir], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0 and "after step 2" in resumed.stdout, resumed.stderr[-3000:]
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("value/train_mse", "value/heldout_mse"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    assert [e.step for e in events.Scalars("losses/loss")] == [1, 2, 3, 4]
