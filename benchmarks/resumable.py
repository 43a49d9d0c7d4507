"""What the multi-seed benchmarks share: a results JSON that a killed benchmark resumes from, a queue of script runs
(several at a time, one thread each) that records each run the moment it ends, and the marked table region of a
docs page that the benchmark rewrites."""

import argparse
import json
import os
import subprocess
import time
from typing import Callable

import numpy as np


def add_queue_arguments(
    parser: argparse.ArgumentParser, script: str, output_dir: str, results: str, page: str, root: str
) -> None:
    """The options every resumable benchmark has: parallel runs, where they write, the table-only mode, the page
    region to fill, and flags passed on to every run of `script`."""
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--results", default=results)
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table from the JSON")
    parser.add_argument(
        "--page",
        nargs="?",
        const=page,
        default=None,
        help=f"write the table into this page's marked region (default {os.path.relpath(page, root)})",
    )
    parser.add_argument("extra", nargs="*", help=f"more {script} flags for every run, after --")


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd / sqrt(n)) over seeds; the error is NaN for one seed."""
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}, "records": []}


def load_records(path: str) -> list[dict]:
    """The records of a JSON list that a benchmark appends to (ppo_phases.py `--json`); none when there is no file."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)  # a benchmark killed while writing keeps the previous file


def run_queue(
    todo: list[tuple[str, list[str]]],
    record: Callable[[str, str, float], dict],
    results: dict,
    results_path: str,
    output_dir: str,
    cwd: str,
    jobs: int = 1,
    threads: int = 1,
) -> None:
    """Run each (key, command) of `todo` whose key is not yet in `results["runs"]`, `jobs` at a time with
    `threads` intra-op threads each, its output in `<output_dir>/<key>.log`; when one ends, `record(key, log_path,
    seconds)` becomes `results["runs"][key]` and the JSON is saved at once. A failed run stops the benchmark."""
    todo = [(key, cmd) for key, cmd in todo if key not in results["runs"]]
    running: dict = {}
    os.makedirs(output_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while todo or running:
        while todo and len(running) < jobs:
            key, cmd = todo.pop(0)
            log_path = os.path.join(output_dir, f"{key.replace('/', '_')}.log")
            print(" ".join(cmd[1:]), flush=True)
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc] = (key, log_path, time.time())
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            key, log_path, started = running.pop(proc)
            if proc.returncode != 0:
                for other in running:
                    other.terminate()
                raise SystemExit(f"error: {key} failed; see {log_path}")
            results["runs"][key] = record(key, log_path, time.time() - started)
            save(results_path, results)
            print(f"{key}: done in {time.time() - started:.0f} s", flush=True)


def summary_of(out_dir: str) -> dict:
    """The summary.json of the one finished run under `out_dir` (a script's --output-dir)."""
    (run_dir,) = [d for d in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, d, "summary.json"))]
    with open(os.path.join(out_dir, run_dir, "summary.json")) as f:
        return json.load(f)


def write_region(page: str, text: str, start: str, end: str) -> None:
    """Replace the region between the `start` and `end` marker lines of `page` (a new page is just the region)."""
    doc = open(page).read() if os.path.exists(page) else f"{start}\n{end}\n"
    if start not in doc or end not in doc:
        raise SystemExit(f"error: {page} has no {start} ... {end} region")
    head, rest = doc.split(start, 1)
    with open(page, "w") as f:
        f.write(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
