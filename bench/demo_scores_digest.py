"""The digest of a demo's scores, paths aside: two ``results.json`` files with the same digest
hold the same numbers, whatever folders they were written to.

    python bench/demo_scores_digest.py runs/demo/reports/demo-<key>/results.json [other results.json ...]

A refactor of the demo's plumbing is done when ``make demo`` on the same machine gives the
same digest as before it. Prints one line per file and, for several files, whether they agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

COMPARED = ("scores", "conclusions", "verdict", "table")
# Where a result lies, not what it is.
PATHS = ("uri", "index_uri", "detections_uri")


def without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items() if key not in PATHS}
    if isinstance(value, list):
        return [without_paths(item) for item in value]
    return value


def scores_digest(results: dict[str, Any]) -> str:
    canonical = json.dumps({key: without_paths(results[key]) for key in COMPARED}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="a demo's results.json")
    paths = parser.parse_args(argv).results
    digests = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            digests.append(scores_digest(json.load(handle)))
        print(f"{digests[-1]}  {path}")
    if len(paths) > 1:
        print("same scores" if len(set(digests)) == 1 else "different scores")
    return 0 if len(set(digests)) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
