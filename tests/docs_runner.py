"""Run several documented method-script commands in one interpreter, for tests/test_docs.py.

Each command runs as `python <script> <flags>` would: `runpy.run_path` with `__name__ == "__main__"`, the
repository root first on sys.path and `sys.argv` set, its exit code taken from SystemExit. torch and
transformers are imported once per batch instead of once per command (about half of a tiny command's time).
Reads a JSON list of argv lists on stdin; prints a JSON list of {"returncode", "stdout", "stderr"}.
"""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(argv: list[str]) -> dict:
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_argv = sys.argv
    sys.argv = list(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
        except SystemExit as exit_:  # what the interpreter would turn into an exit code
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    sys.argv = saved_argv
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    results = [run_one(argv) for argv in json.load(sys.stdin)]
    sys.__stdout__.write(json.dumps(results))


if __name__ == "__main__":
    main()
