"""The scripts' command line: flags that fail in one line, and a main() that turns user errors into exit code 2.

A user's mistake (a bad flag, a missing file, an unreadable checkpoint) never shows a traceback:

    def main(argv=None):
        run_main(lambda: train(parse_args(argv)))    # prints "error: ..." and exits 2 on a user error
"""
import argparse
import errno
import sys

from data.shards import DataError


class ConfigError(ValueError):
    """A bad flag or value: reported in one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ConfigError (one line, exit 2) instead of printing the usage."""

    def error(self, message):
        raise ConfigError(message)


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
    """Call fn(); a ConfigError, DataError or OSError becomes 'error: ...' on stderr and exit code 2."""
    try:
        return fn()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
