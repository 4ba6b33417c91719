# SPDX-License-Identifier: BSD-2-Clause
"""Build a multiboot guest and print the path of its ``.elf``.

``python -m hvf.testing.guests hello`` builds the sample guest shipped with hvf (the
README's first example); ``python -m hvf.testing.guests PATH.S`` (or ``.c``) builds a
guest of your own with the same runtime. The output goes to ``--out DIR``, by default
``$XDG_CACHE_HOME/hvf/guests`` (``~/.cache/hvf/guests``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hvf.testing.guests import RUNTIME, GuestBuildError, build_guest

#: The guests shipped with hvf, by name.
SAMPLES = {"hello": "greets, shows its command line and memory, exits with exit=N"}


def default_out() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hvf" / "guests"


def main(argv: list[str] | None = None) -> int:
    samples = "; ".join(f"{name}: {what}" for name, what in SAMPLES.items())
    parser = argparse.ArgumentParser(
        prog="python -m hvf.testing.guests",
        description="Build a multiboot guest for hvf and print the path of its .elf.",
        epilog=f"samples: {samples}")
    parser.add_argument("guest", help="a sample's name, or a NAME.S / NAME.c file")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where the .elf goes (default {default_out()})")
    args = parser.parse_args(argv)
    if args.guest in SAMPLES:
        source = RUNTIME / f"{args.guest}.S"
    elif args.guest.endswith((".S", ".c")):
        source = Path(args.guest)
    else:
        parser.error(f"no sample guest {args.guest!r} (samples: {', '.join(SAMPLES)}), "
                     "and not a .S or .c file")
    try:
        elf = build_guest(source, args.out or default_out())
    except GuestBuildError as e:
        print(f"python -m hvf.testing.guests: {e}", file=sys.stderr)
        return 1
    print(elf.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
