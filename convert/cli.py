"""What every command-line tool of ours does with bad input: one clear line, exit status 1."""

from __future__ import annotations

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
