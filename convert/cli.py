"""What every command-line tool of ours does with bad input: one clear line, exit status 1."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from convert.errors import CheckpointError


@contextlib.contextmanager
def reported_errors(prog: str) -> Iterator[None]:
    """Turns a CheckpointError into `prog: error: ...` on stderr and exit status 1, no traceback."""
    try:
        yield
    except CheckpointError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def src_out_parser(prog: str, description: str, *, src_help: str, out_help: str) -> argparse.ArgumentParser:
    """The arguments every converter shares: SRC, OUT, --overwrite, --no-progress."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help=src_help)
    parser.add_argument("out", help=f"{out_help} (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser
