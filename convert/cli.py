"""The arguments every converter shares."""

from __future__ import annotations

import argparse


def src_out_parser(prog: str, description: str, *, src_help: str, out_help: str) -> argparse.ArgumentParser:
    """The arguments every converter shares: SRC, OUT, --overwrite, --no-progress."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help=src_help)
    parser.add_argument("out", help=f"{out_help} (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser
