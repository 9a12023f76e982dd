"""Print the per-module table of a mutmut run (scripts/mutate): mutants, caught, survived.

"Caught" counts mutants a test failed on or that ran into mutmut's timeout (an endless loop
is noticed too); "no tests" are mutants in code no unit test reaches, and count as missed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

CAUGHT = ("killed", "timeout", "caught by type check", "segfault")


def main(modules: list[str]) -> int:
    print("| module | mutants | caught | survived | no tests | not checked | caught % |")
    print("|---|---|---|---|---|---|---|")
    for module in modules:
        meta = Path("mutants/dify_proxy") / f"{module}.py.meta"
        if not meta.exists():
            print(f"| {module}.py | not run | | | | | |")
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        counts = Counter(status_by_exit_code[code] for code in codes)
        total = sum(counts.values())
        caught = sum(counts[status] for status in CAUGHT)
        share = f"{100 * caught / total:.0f}%" if total else "-"
        print(
            f"| {module}.py | {total} | {caught} | {counts['survived']} | {counts['no tests']} "
            f"| {counts['not checked']} | {share} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
