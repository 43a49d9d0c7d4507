"""benchmarks/: the runner's aggregation, table, README rewriting and per-child peak memory; the TRL
comparison's ratios. Fast (no training); the end-to-end runner is exercised by tests/test_docs.py."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# E402 on purpose: the benchmark scripts import only once benchmarks/ is on sys.path
import run as bench  # noqa: E402
import trl_compare  # noqa: E402


def fake_run(seed, final, status="ok", script="ppo.py", task="sentiment", rss=400.0):
    start = {
        "eval/return_mean": 0.1,
        "eval/perplexity": 4.0,
        "eval/ref_nll": 1.5,
        "eval/grammatical": 0.9,
        "eval/distinct_2": 0.5,
    }
    end = {
        "eval/return_mean": final,
        "eval/perplexity": 4.0 + seed,
        "eval/ref_nll": 2.0,
        "eval/grammatical": 0.8,
        "eval/distinct_2": 0.4,
    }
    return {
        "script": script,
        "task": task,
        "seed": seed,
        "status": status,
        "peak_rss_mib": rss,
        "flags": [],
        "summary": {
            "initial": start,
            "final": end,
            "wall_seconds": 10.0 * seed,
            "tokens_per_second": 100.0,
            "updates": 40,
        },
        "curves": {"eval/return_mean": [(0, 0.1), (40, final)], "objective/kl": [(1, 0.0), (40, 0.1 * seed)]},
    }


def test_mean_std_is_sample_std():
    assert bench.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert bench.mean_std([5.0]) == (5.0, 0.0)


def test_aggregate_and_table():
    runs = [
        fake_run(1, 0.5),
        fake_run(2, 0.7),
        fake_run(3, 0.6),
        {"script": "ilql.py", "task": "wordle", "seed": 1, "status": "failed", "detail": "exit code 1: boom"},
    ]
    (row,) = bench.aggregate(runs)
    assert row["seeds"] == [1, 2, 3] and row["budget"] == "40 updates"
    table = bench.markdown_table([row])
    assert (
        "| `ppo.py` | sentiment | 40 updates | 1-3 | +0.100 ± 0.000 | **+0.600 ± 0.100** | 6.00 ± 1.00 "
        "| 0.80 ± 0.00 | 20 ± 10 |"
    ) in table
    assert "`ilql.py` on wordle: failed: exit code 1: boom" in bench.problems_text(runs)
    # docs/results.md: mean ± standard error (0.1 / sqrt(3) = 0.058); the starting model from ppo.py's step 0
    results = bench.results_table([row]).splitlines()
    assert results[2] == (
        "| starting model (`ppo.py` at step 0) | - | 1-3 | +0.100 ± 0.000 | 4.00 ± 0.00 "
        "| 1.50 ± 0.00 | 0.90 ± 0.00 | 0.50 ± 0.00 | 0 | - | - |"
    )
    assert results[3] == (
        "| `ppo.py` | 40 updates | 1-3 | **+0.600 ± 0.058** | 6.00 ± 0.58 | 2.00 ± 0.00 "
        "| 0.80 ± 0.00 | 0.40 ± 0.00 | 0.200 ± 0.058 | 20 ± 6 | 400 ± 0 |"
    )
    # what training changed: paired differences final - initial, mean ± s.e. over seeds
    assert bench.changes_text([row]) == (
        "- `ppo.py`: return 0.100 -> 0.600 (+0.500 ± 0.058); perplexity 4.00 -> 6.00 "
        "(+2.00 ± 0.58); ref_nll 1.50 -> 2.00 (+0.50 ± 0.00); grammatical 0.900 -> "
        "0.800 (-0.100 ± 0.000); distinct-2 0.500 -> 0.400 (-0.100 ± 0.000)"
    )
    # KL only where the method has a KL term to its starting model
    assert bench.final_kl(fake_run(2, 0.5)) == pytest.approx(0.2)
    assert bench.final_kl(fake_run(2, 0.5, script="alol.py")) is None


def test_results_resume_reuses_finished_runs(tmp_path, monkeypatch):
    """--results --resume: runs already in results.json are not run again; the page is written from them."""
    import json

    results_dir = tmp_path / "results"
    runs = [dict(fake_run(seed, 0.5), flags=[]) for seed in (1, 2)]
    bench.save_runs(str(results_dir / "results.json"), "cmd", ["m"], runs)
    config = tmp_path / "config.toml"
    config.write_text(
        '[[entry]]\nscript = "ppo.py"\ntask = "sentiment"\nflags = []\n\n'
        '[[entry]]\nscript = "ilql.py"\ntask = "wordle"\nflags = []\n'
    )
    monkeypatch.setattr(bench, "run_child", lambda *a, **k: pytest.fail("a kept run was run again"))
    pages = []
    monkeypatch.setattr(bench, "write_results_page", lambda path, rows, *a: pages.append(rows))
    assert (
        bench.main(
            ["--results", "--resume", "--seeds", "2", "--config", str(config), "--results-dir", str(results_dir)]
        )
        == 0
    )
    (rows,) = pages
    assert [(r["script"], r["seeds"]) for r in rows] == [("ppo.py", [1, 2])]  # wordle is not a sentiment entry
    assert json.loads((results_dir / "results.json").read_text())["runs"][0]["seed"] == 1


def test_replace_region_keeps_everything_outside_the_markers():
    text = f"intro\n{bench.START}\nold table\n{bench.END}\noutro\n"
    new = bench.replace_region(text, "new table")
    assert new == f"intro\n{bench.START}\nnew table\n{bench.END}\noutro\n"
    assert bench.replace_region(new, "new table") == new  # idempotent
    with pytest.raises(ValueError):
        bench.replace_region("no markers", "x")


def test_benchmarks_readme_has_both_regions():
    """run.py and trl_compare.py rewrite their regions of benchmarks/README.md; the markers must be there."""
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        text = f.read()
    for start, end in ((bench.START, bench.END), (trl_compare.START, trl_compare.END)):
        assert text.index(start) < text.index(end)


def test_peak_memory_is_per_child(tmp_path):
    """os.wait4 gives each child's own peak: a small child after a big one is not reported as big.

    Measured from a fresh, small launcher process, as benchmarks/run.py is in use: Linux carries the
    parent's resident set into a forked child's peak, so children of this pytest process (torch
    loaded, ~600 MiB) would all look big."""
    import json
    import subprocess

    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import run as bench\n"
        "big = bench.run_child([sys.executable, '-c', "
        "\"x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])\"],"
        f" {str(tmp_path / 'big.log')!r})\n"
        f"small = bench.run_child([sys.executable, '-c', 'pass'], {str(tmp_path / 'small.log')!r})\n"
        "print(json.dumps([big, small]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    big, small = json.loads(out.strip().splitlines()[-1])
    assert big["returncode"] == 0 and small["returncode"] == 0
    assert big["peak_rss_mib"] > 300 and small["peak_rss_mib"] < 100


def test_config_entries_name_a_script_and_a_task():
    entries = bench.load_config(os.path.join(ROOT, "benchmarks", "config.toml"))
    assert any(e["script"] == "ppo.py" for e in entries)
    for e in entries:
        assert e["script"].endswith(".py") and e["task"] and isinstance(e.get("quick", []), list)


def test_trl_table_ratios_are_relative_to_ppo():
    results = [
        {
            "trainer": "ppo.py",
            "samples": 100,
            "train_seconds": 10.0,
            "peak_rss_mib": 500.0,
            "final": {"eval/return_mean": 0.5},
        },
        {
            "trainer": "grpo",
            "samples": 100,
            "train_seconds": 5.0,
            "peak_rss_mib": 750.0,
            "final": {"eval/return_mean": 0.3, "eval/perplexity": 8.0, "eval/grammatical": 0.2, "eval/distinct_2": 0.1},
        },
    ]
    table = trl_compare.comparison_table(results, initial=0.1)
    ours, grpo = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| TRL")]
    assert "| 10.0 | 1.00x | +0.500 | +0.400 | 1.00x | n/a | n/a | n/a | 500 | 1.00x |" in ours
    assert "| 20.0 | 2.00x | +0.300 | +0.200 | 0.50x | 8.00 | 0.20 | 0.10 | 750 | 1.50x |" in grpo


def test_trl_heldout_eval_scores_a_model_like_ppo_py(monkeypatch):
    """The TRL side-by-side scores TRL's models with ppo.py's evaluation: same prompts and per-prompt seeds,
    so the starting model gets ppo.py's step-0 number (here on a few prompts; TRL itself is not needed)."""
    from common.models import load_policy
    from common.tasks import evaluate, make_task
    from common.utils import episode_seeds

    monkeypatch.setattr(trl_compare, "EVAL_EPISODES", 6)
    task = make_task("sentiment")
    policy = load_policy("tiny-gpt2", task)
    metrics = trl_compare.heldout_eval(policy.model, policy.tokenizer, task, seed=1)

    def ppo_like(prompts, indices):
        ids, mask = policy.encode_prompts(prompts, task.max_prompt_tokens, "cpu")
        response, response_mask = policy.generate(
            ids, mask, trl_compare.RESPONSE_LENGTH, task.min_new_tokens, seeds=episode_seeds(1, 1, 0, indices)
        )
        return policy.decode(response, response_mask)

    expected = evaluate(
        task, ppo_like, 6, 64, policy=policy, start_model=policy, response_length=trl_compare.RESPONSE_LENGTH
    )[0]
    assert metrics.keys() == expected.keys() and {"eval/perplexity", "eval/grammatical"} <= metrics.keys()
    assert metrics == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# The resumable multi-seed benchmarks (benchmarks/resumable.py, alol_variants.py, ilql_wordle.py)
# ----------------------------------------------------------------------------------------------
def test_run_queue_records_each_run_once_and_resumes(tmp_path):
    import json

    import resumable

    results_path = str(tmp_path / "results.json")
    ok = [sys.executable, "-c", "print('hello')"]
    todo = [("a/1", ok), ("b/1", ok)]
    results = resumable.load(results_path)
    resumable.run_queue(
        todo,
        lambda key, log, seconds: {"key": key, "log": open(log).read()},
        results,
        results_path,
        str(tmp_path / "out"),
        ROOT,
        jobs=2,
    )
    saved = json.load(open(results_path))
    assert saved["runs"] == {"a/1": {"key": "a/1", "log": "hello\n"}, "b/1": {"key": "b/1", "log": "hello\n"}}
    # resumed: a recorded run is never started again; a failing run stops the queue with its log named
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(SystemExit, match="c/1 failed; see .*c_1.log"):
        resumable.run_queue(
            [("a/1", failing), ("c/1", failing)],
            lambda *a: {},
            resumable.load(results_path),
            results_path,
            str(tmp_path / "out"),
            ROOT,
        )
    assert set(json.load(open(results_path))["runs"]) == {"a/1", "b/1"}


def test_alol_claims_are_paired_differences_over_the_seeds_every_variant_finished():
    import alol_variants as av

    def run(variant, seed, ret, grammar=0.9):
        metrics = {"return_mean": ret, "grammatical": grammar, "perplexity": 4.0, "ref_nll": 1.5, "distinct_2": 0.3}
        return {"variant": variant, "seed": seed, **metrics, "pi_ref": metrics, "loaded": None}

    runs = [
        run("a_lol", 1, 0.5),
        run("a_lol", 2, 0.7),
        run("a_lol", 3, 0.9),
        run("nll", 1, 0.1, 0.5),
        run("nll", 2, 0.4, 0.6),
    ]  # nll has no seed 3 yet
    results = {"runs": {f"{r['variant']}/{r['seed']}": r for r in runs}}
    records, claims = av.aggregate(results, ["a_lol", "nll"], [1, 2, 3])
    assert [r["variant"] for r in records] == ["pi_ref (fine-tuned on the log)", "a_lol", "nll"]
    a_lol = records[1]
    assert a_lol["seeds"] == [1, 2] and a_lol["return_mean"] == pytest.approx(0.6)
    assert a_lol["return_se"] == pytest.approx(0.1)  # sample sd 0.1414 / sqrt(2)
    beats_nll, grammar = claims
    assert beats_nll["claim"] == "A-LoL beats nll" and beats_nll["a_wins"] == 2
    assert beats_nll["difference_mean"] == pytest.approx(0.35) and beats_nll["difference_se"] == pytest.approx(0.05)
    assert grammar["metric"] == "grammatical" and grammar["difference_mean"] == pytest.approx(0.35)


def test_ilql_wordle_claim_against_the_best_filtering():
    import ilql_wordle as iw

    def record(method, mean, se, seeds=(1, 2)):
        return {"dataset": "per_move", "method": method, "return_mean": mean, "return_se": se, "seeds": list(seeds)}

    records = [
        {"dataset": "-", "method": "expert", "return_mean": -1.5, "return_se": 0.0, "seeds": []},
        record("bc", -3.5, 0.1),
        record("pct_bc_25", -2.5, 0.03),
        record("pct_bc_50", -2.2, 0.04),
        record("ilql", -1.9, 0.03),
    ]
    runs = {
        "per_move/ilql/1": {"return_mean": -1.8},
        "per_move/ilql/2": {"return_mean": -2.0},
        "per_move/pct_bc_50/1": {"return_mean": -2.3},
        "per_move/pct_bc_50/2": {"return_mean": -2.1},
    }
    (claim,) = iw.claims(records, {"runs": runs})
    assert claim["best_pct_bc"] == "pct_bc_50" and claim["difference"] == pytest.approx(0.3)
    assert claim["combined_se"] == pytest.approx(0.05)  # hypot(0.03, 0.04)
    assert claim["paired_difference"] == pytest.approx(0.3) and claim["ilql_wins"] == 2
    assert claim["gap_closed"] == pytest.approx(0.8)  # (-1.9 + 3.5) / (-1.5 + 3.5)
    # BC already at the expert's level (the per-game data, seed 1): no gap to close, and the table says so
    records[1] = record("bc", -1.5, 0.0)
    (claim,) = iw.claims(records, {"runs": runs})
    assert claim["gap_closed"] is None
    assert "none: BC is at the expert" in iw.claims_table([claim])


def test_ilql_wordle_reads_the_curve_beta_sweep_and_oracle_from_a_log():
    import ilql_wordle as iw

    log = (
        "eval @ step 0: return -6.000 +- 0.000 | win rate 0.000 | repeat rate 0.000\n"
        "step 1000/2000 | q_loss 0.07\neval @ step 1000: return -2.510 +- 1.814 | win rate 0.810 | repeat rate 0.1\n"
        "beta 0: return -4.280 +- 2.057 | win rate 0.475 | repeat rate 0.562\n"
        "beta 16: return -2.535 +- 1.813 | win rate 0.810 | repeat rate 0.123\n"
        "pi_beta without repeats (oracle): return -4.410 +- 2.077 | win rate 0.420 | repeat rate 0.000\n"
    )
    got = iw.log_lines(log)
    assert got["curve"] == [[0, -6.0], [1000, -2.51]]
    assert got["beta_sweep"] == {"0": [-4.28, 0.475, 0.562], "16": [-2.535, 0.81, 0.123]}
    assert got["no_repeat_oracle"] == [-4.41, 0.42]
    assert iw.log_lines("eval @ step 0: return -6.000 +- 0.000")["no_repeat_oracle"] is None


def test_phase_benchmark_counts_gpt2_matmul_weights():
    """GPT-2's block holds 12 d^2 matmul weights (attention 3d^2 + d^2, MLP 4d^2 + 4d^2); the embedding tables
    and the tied output layer are not trunk weights (the output layer is counted per response token)."""
    import ppo_phases
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    assert ppo_phases.matmul_weights(model) == 2 * 12 * 16**2


def test_cost_curve_table_orders_points_by_model_then_length():
    """One row per point, the tiny model first and lengths ascending, the CPU's missing memory shown as '-'."""
    import cost_curve

    def point(model, length, memory):
        return {
            "model": model,
            "device": "CPU (1 threads)",
            "batch": 8,
            "minibatch": 8,
            "response_length": length,
            "samples_per_second": 100.0 / length,
            "update_seconds": length / 10,
            "peak_memory_mib": memory,
        }

    rows = cost_curve.table(
        [point("runs/gpt2-small-shape", 48, 6000.4), point("tiny-gpt2", 96, None), point("tiny-gpt2", 24, 550.0)]
    ).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| tiny-gpt2", "| tiny-gpt2", "| gpt2-small-shape"]
    assert [r.split(" | ")[3] for r in rows] == ["24", "96", "48"]
    assert rows[0].endswith("| 550 |") and rows[1].endswith("| - |") and rows[2].endswith("| 6000 |")


def _sync_gradients_worker(rank: int, init_file: str, results) -> None:
    import torch
    import torch.distributed as dist
    from ddp_sync import sync_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    used, used_by_rank0, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    used.grad = torch.full((3,), float(rank + 1))  # ranks send 1 and 2: the average is 1.5
    if rank == 0:
        used_by_rank0.grad = torch.full((3,), 4.0)  # rank 1 did not use it: counts as zeros, average 2
    sync_gradients([used, used_by_rank0, unused], bucket_numel=2)  # buckets smaller than one tensor still work
    results[rank] = (used.grad.tolist(), used_by_rank0.grad.tolist(), unused.grad)
    dist.destroy_process_group()


def test_ddp_sync_written_out_averaging_across_two_processes(tmp_path):
    """ddp_sync.py's `sync_gradients`, the averaging DDP is measured against, averages what DDP would."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_sync_gradients_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        used, used_by_rank0, unused = results[rank]
        assert used == [1.5] * 3 and used_by_rank0 == [2.0] * 3
        assert unused is None  # no rank used it: the optimizer skips it, as with one process
