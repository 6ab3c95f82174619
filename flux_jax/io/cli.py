"""What every command-line tool of ours does with a `UserError`: one line naming the fault, exit status 1."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from flux_jax.io.errors import UserError


@contextlib.contextmanager
def reported_errors(prog: str, *, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turns a `UserError` (or one of `also`, e.g. ValueError for a tool whose library calls check their
    arguments with it) into `prog: error: ...` on stderr and exit status 1, with no traceback; Ctrl-C
    into `prog: interrupted` and status 130."""
    try:
        yield
    except (UserError, *also) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
