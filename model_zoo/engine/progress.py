"""Progress bars that only draw on a terminal.

A run whose output goes to a file (every long run and every tuner trial) gets no bar frames in its
log: the epoch summary line is its progress report.
"""
import sys

from tqdm import tqdm


def on_terminal():
    """True when stderr (where tqdm and the log handler write) is a terminal."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(iterable=None, total=None, desc=None, unit="it", verbose=True):
    """A tqdm bar that is shown only with `verbose` and a terminal on stderr; a no-op wrapper otherwise."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not (verbose and on_terminal()))
