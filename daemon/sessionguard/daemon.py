"""Placeholder until its issue lands."""

import sys


def main() -> int:
    print("sessionguard: daemon not implemented yet", file=sys.stderr)
    return 2
