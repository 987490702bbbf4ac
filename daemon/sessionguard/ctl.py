"""Placeholder until its issue lands."""

import sys


def main() -> int:
    print("sessionguard: ctl not implemented yet", file=sys.stderr)
    return 2
