"""Fails a CI run whose tests skipped where they must run.

Reads the log of `pytest -rs` (one `SKIPPED [n] file:line: reason` line per skip and the closing
`... N skipped ...` count) and exits 1 naming every skip that matches no allowed entry, or when
the skip lines do not add up to the closing count (a report it could not read).

Usage: python .ci/check_skips.py LOG [--allow FILE_PREFIX ...]
"""

import re
import sys

# (file prefix, reason pattern) of the skips CI accepts. None today: CI installs torch and the
# tracking packages and starts a Slurm cluster, so every test runs. An entry says why.
ALLOWED: list[tuple[str, str]] = []

_SKIP = re.compile(r"^SKIPPED \[(\d+)\] ([^:\s]+):(\d+): (.*)$")
_COUNT = re.compile(r"\b(\d+) skipped\b")


def unexpected_skips(log: str, allowed: list[tuple[str, str]]) -> list[str]:
    """The skip lines of ``log`` that no (file prefix, reason pattern) of ``allowed`` covers."""
    skips = [m for m in map(_SKIP.match, log.splitlines()) if m]
    closing = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    counted = _COUNT.search(closing[-1]) if closing else None
    total = int(counted[1]) if counted else 0
    if sum(int(m[1]) for m in skips) != total:
        return [f"{total} skipped in the closing line, but the -rs report lists "
                f"{sum(int(m[1]) for m in skips)} (was pytest run with -rs?)"]
    return [m[0] for m in skips
            if not any(m[2].startswith(f) and re.search(r, m[4]) for f, r in allowed)]


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    extra = argv[argv.index("--allow") + 1:] if "--allow" in argv else []
    allowed = ALLOWED + [(f, "") for f in extra]
    with open(argv[0], encoding="utf-8", errors="replace") as f:
        bad = unexpected_skips(f.read(), allowed)
    for line in bad:
        print(f"unexpected skip: {line}", file=sys.stderr)
    if bad:
        print(f"check_skips: {len(bad)} unexpected skip(s); every test must run in CI "
              f"(or be allowed in .ci/check_skips.py with its reason)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
