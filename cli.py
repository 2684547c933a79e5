"""The scripts' command line: flags that fail in one line, and a main() that turns user errors into exit code 2.

A user's mistake (a bad flag, a missing file, an unreadable checkpoint) never shows a traceback:

    def main(argv=None):
        run_main(lambda: train(parse_args(argv)))    # prints "error: ..." and exits 2 on a user error
"""
import argparse
import errno
import os
import sys

from data import DataError


class ConfigError(ValueError):
    """A bad flag or value: reported in one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ConfigError (one line, exit 2) instead of printing the usage.

    Flags must be spelled in full: argparse's prefix matching would take `--max_step 5` as `--max_steps 5`
    (and a new flag could silently change what an old abbreviation means). An unknown flag that begins a known
    one is named in the error: "unrecognized arguments: --max_step 5 (did you mean --max_steps?)"."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        raise ConfigError(message)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise ConfigError(f"unrecognized arguments: {' '.join(extras)}{self.did_you_mean(extras)}")
        return namespace

    def did_you_mean(self, extras):
        """' (did you mean --max_steps?)' for the unknown flags in extras that begin known ones, else ''."""
        hints = []
        for flag in (arg.split("=", 1)[0] for arg in extras if arg.startswith("--") and arg != "--"):
            if known := sorted(o for o in self._option_string_actions if o.startswith(flag)):
                hints.append((flag, " or ".join(known) if len(known) <= 2 else f"one of {', '.join(known)}"))
        if len(hints) == 1:
            return f" (did you mean {hints[0][1]}?)"
        return " (" + "; ".join(f"{flag}: did you mean {names}?" for flag, names in hints) + ")" if hints else ""


def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def os_error_line(e):
    """One line for an OSError: 'no space left on device while writing PATH' rather than a C++ trace."""
    where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{where}"
    return f"{e.strerror or e}{f': {e.filename}' if getattr(e, 'filename', None) else ''}"


def run_main(fn):
    """Call fn(); a ConfigError, DataError or OSError becomes 'error: ...' on stderr and exit code 2.

    A reader that stops early (`python sample.py | head -1`) closes our stdout: we stop quietly with exit
    code 1, as Python's docs advise, rather than print a BrokenPipeError. (Restoring SIGPIPE's default
    would also kill us on a closed socket, e.g. while downloading weights.)"""
    try:
        return fn()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush writes nowhere
        sys.exit(1)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def check_seed(seed, flag="--seed"):
    """numpy and torch take seeds in 0..2^32-1: anything else is a ConfigError now, not a crash later."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{flag}: must be in 0..{2**32 - 1}, got {seed}")
    return seed


def dir_problem(path):
    """Why we could not create or write into directory path (the nearest existing ancestor decides), or None."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_out_dir(path, flag="--out_dir"):
    """A directory we can write into, or one we can create: not a file, not under a file, not read-only."""
    if not path:
        raise ConfigError(f"{flag}: empty (name a directory)")
    if problem := dir_problem(path):
        raise ConfigError(f"{flag} {path}: {problem}")
    return path


def check_out_file(path, flag):
    """An output file we can write: its directory must be writable (or creatable) and it must not be a directory.
    The error names the file as given, not its directory."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory, not a file")
    if problem := dir_problem(os.path.dirname(path) or "."):
        raise ConfigError(f"{flag} {path}: {problem}")
    return path
