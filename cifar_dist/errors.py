"""Errors a user can cause (exit 2) and faults of the environment or of training (exit 1), each
printed as one line naming the rank; nothing heavy is imported, so bad input is reported
before torch loads."""

import contextlib
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input: config, data, checkpoint or arguments (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in a config."""


class DataError(UserError):
    """Missing, truncated, corrupt or hostile data files."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into this run."""


class RunDirError(UserError):
    """A run directory that is in use, or would be overwritten."""


class EnvironmentFault(Exception):
    """A fault of the environment (disk full, dead peer): exit code 1, one line."""

    exit_code = 1


class TrainingFault(Exception):
    """Training went wrong (NaN/Inf loss or gradients): exit code 1, one line."""

    exit_code = 1


class NonFiniteError(TrainingFault):
    """The loss or the gradients became NaN or Inf."""


class Interrupted(Exception):
    """Ctrl-C ended the run at once (exit code 130); the message says what was kept."""

    exit_code = 130


def say(line: str) -> None:
    """``line`` and its newline on stderr in one write, so ranks sharing a pipe never interleave
    (print writes the text and the newline apart)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def fail(message: str, code: int, rank: str = "") -> None:
    """One line on stderr after ``rank``, then exit; under torchrun it also goes into the
    launcher's error file, whose closing report would otherwise say only "exitcode: 2"."""
    line = f"cifar-dist: {rank}{message}"
    say(line)
    _tell_the_launcher(line)
    sys.exit(code)


def _tell_the_launcher(line: str) -> None:
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    with contextlib.suppress(OSError), open(path, "w") as f:
        json.dump({"message": line, "timestamp": int(time.time())}, f)


def one_line_warning(message, category, filename, lineno, file=None, line=None, rank: str = "") -> None:
    """A warning as one line on stderr; another package's names its category and origin."""
    text = " ".join(str(message).split())
    if "cifar_dist" in str(filename):
        say(f"cifar-dist: {rank}warning: {text}")
    else:
        say(f"cifar-dist: {rank}warning from {os.path.basename(str(filename))}:{lineno}: {category.__name__}: {text}")


def _out_of_memory(e: Exception) -> bool:
    """OutOfMemoryError, MemoryError, or a CPU allocator's RuntimeError ("not enough memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and ("not enough memory" in str(e) or "out of memory" in str(e).lower())


def guarded(fn, args, rank_prefix: Callable[[], str] = lambda: "") -> int:
    """Run the command ``fn(args)``: user errors and faults become one line and exit 2 or 1; a bug
    names the rank (``rank_prefix``, "rank 1: ") and shows its traceback."""
    import warnings

    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        one_line_warning(message, category, filename, lineno, rank=rank_prefix())

    warnings.showwarning = show
    try:
        return fn(args)
    except UserError as e:
        fail(str(e), 2, rank_prefix())
    except (EnvironmentFault, TrainingFault, Interrupted) as e:
        fail(str(e), e.exit_code, rank_prefix())
    except KeyboardInterrupt:
        fail("interrupted", 130, rank_prefix())
    except BrokenPipeError:  # the reader of stdout left (`cifar-dist config | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a program that SIGPIPE ended
    except Exception as e:
        if _out_of_memory(e):
            first = (str(e) or "host").splitlines()[0][:160]
            hint = "a smaller model or batch (train.batch_size, train.accum_steps) fits"
            fail(f"out of memory: {first}; {hint}", 1, rank_prefix())
        else:
            say(f"cifar-dist: {rank_prefix()}crashed: {type(e).__name__}: {e}")
            raise
    return 1
