"""Run many command lines of the scripts in one Python process, each as `python SCRIPT ARGS...` would run it.

    python tests/cli_batch.py cases.json results.json

Each case of the JSON list is {"script", "argv", "cwd"} with an optional "fsize_limit" (bytes: files this process
writes may not grow past it, as on a full disk) and "timeout" (seconds, default 60: a case still running then is
stopped with a traceback, and the next one runs). Each script runs as `__main__` with `sys.argv` set (tyro parses
it, exactly the CLI), its stdout and stderr captured; an uncaught SystemExit ends the case as the interpreter
would end the process (a message: printed to stderr, exit code 1), any other exception prints its traceback and
counts as exit code 1. The results list holds {"code", "stdout", "stderr", "seconds"} per case.

Starting Python with torch and transformers takes seconds; paying that once for dozens of cases keeps the bad-input
table of tests/test_faults.py fast. What one case leaves in the process (imported modules, the torch RNG) is what
a real process would have started without; every case here fails or finishes on its own arguments.
"""

import contextlib
import io
import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CaseTimeout(BaseException):
    """Raised in a case that runs too long; a BaseException, so no `except Exception` (or OSError) catches it."""


def _timeout(signum, frame):
    raise CaseTimeout("the case ran past its timeout")


def run_case(case: dict) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    start, code = time.time(), 0
    try:
        sys.argv = [case["script"], *case["argv"]]
        sys.path.insert(0, ROOT)  # what `python script.py` puts first
        os.chdir(case.get("cwd", ROOT))
        if case.get("fsize_limit"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize_limit"], hard))
        signal.alarm(int(case.get("timeout", 60)))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(os.path.join(ROOT, case["script"]), run_name="__main__")
            except SystemExit as exit_:  # as the interpreter ends a process on it
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "seconds": time.time() - start}


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size limit fails with EFBIG instead of killing
    signal.signal(signal.SIGALRM, _timeout)
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = [run_case(case) for case in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
