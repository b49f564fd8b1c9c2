"""Check or rewrite the code dependencies of every dvc.yaml stage: the import closure of the module its cmd runs
(stepwise/pipeline_deps.py says how it is computed, and why directories are never listed).

    python -m stages.deps            # print each problem; exit 1 if there is any, 0 if none
    python -m stages.deps --write    # set each stage's code deps to its closure, keeping every other line

Run `--write` after moving code between modules; `tests/test_pipeline_deps.py` fails while dvc.yaml has drifted.
"""
from __future__ import annotations

import argparse
import sys

from stepwise.errors import StepwiseError
from stepwise.pipeline_deps import check, write


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.deps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline file (its directory is the repo root)")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of every stage, then check")
    args = parser.parse_args(argv)
    try:
        if args.write:
            changed = write(args.dvc_yaml)
            print(f"{args.dvc_yaml}: rewrote the code deps of {', '.join(changed)}" if changed
                  else f"{args.dvc_yaml}: code deps already up to date")
        problems = check(args.dvc_yaml)
    except (StepwiseError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
