"""The README's benchmark tables, generated from the committed results.

    python -m rlkern.benches.readme            # rewrite every table of README.md
    python -m rlkern.benches.readme --check    # exit 1 when README.md and the results disagree

A table is the block between ``<!-- results: DEVICE/NAME -->`` and ``<!-- /results -->`` in
README.md; its text is ``common.render`` of ``benches/results/DEVICE/NAME.json`` (the same text
as NAME.md beside it). tests/test_bench_results.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from rlkern.benches import common

BENCHES = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCHES, "results")
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name + ".json")) as f:
        return json.load(f)


def generate(text: str) -> str:
    """``text`` with every results block rewritten from its JSON file."""
    return BLOCK.sub(lambda m: m.group(1) + "\n" + common.render(load(m.group("name"))) + "\n" + m.group(4), text)


def blocks(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(BENCHES), "README.md"))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = generate(text)
    if args.check:
        stale = [name for name, old_block, new_block in zip(blocks(text), BLOCK.findall(text), BLOCK.findall(new))
                 if old_block != new_block]
        for name in stale:
            print(f"{args.readme}: the table of {name} differs from benches/results/{name}.json", file=sys.stderr)
        return 1 if stale else 0
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"{args.readme}: {len(blocks(text))} tables from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
