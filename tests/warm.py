"""Warm starts for the single-process runs of the tests.

Importing torch, its compiler front end (which every optimizer imports) and
matplotlib costs about 35 s per process on a slow 2-core machine. A forkserver
that has imported them once (tests/conftest.py names the modules) forks a fresh process for each `cifar-dist`
command: the command runs the real `cifar_dist.cli.main` in a process of its
own (its own signals, globals, exit code, stdout and stderr), only without
paying for the imports again. Multi-process launches (torchrun, accelerate
launch, Slurm) still start from scratch.
"""

from __future__ import annotations

import os
import sys
import traceback

import cifar_dist.cli.main


def run_cli(argv: list[str], env: dict, out_path: str, err_path: str, cwd: str) -> None:
    """The body of one forked `cifar-dist ARGV`; ends the process with its exit code."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        if env.get("PYTHONWARNINGS") == "ignore":  # what a fresh interpreter does with that variable
            import warnings

            warnings.simplefilter("ignore")
        limit = env.get("CIFAR_DIST_TEST_FSIZE")  # simulate a full disk: files cannot grow past this
        if limit:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
        sys.argv = ["cifar-dist", *argv]
        try:
            code = cifar_dist.cli.main.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
