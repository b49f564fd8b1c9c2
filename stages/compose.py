"""Compose conf/ (Hydra) into params.yaml exactly as DVC does on `dvc exp run` (OmegaConf.to_yaml of the result).

    python -m stages.compose                      # rewrite params.yaml from conf/
    python -m stages.compose experiment=gpu       # with Hydra overrides
    python -m stages.compose --check              # exit 1 if params.yaml differs from the composition
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepwise.io import write_text

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str] | None = None, config_dir: Path = CONF_DIR, config_name: str = "config") -> str:
    """The YAML text DVC would write for these overrides (see dvc.utils.hydra.compose_and_dump)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(config_dir), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.compose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=gpu model=dit")
    parser.add_argument("--out", default="params.yaml")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when they differ")
    args = parser.parse_args(argv)
    text = compose(args.overrides)
    if args.check:
        same = Path(args.out).is_file() and Path(args.out).read_text() == text
        print(f"{args.out} {'matches' if same else 'DIFFERS from'} the composition of conf/ {args.overrides}")
        return 0 if same else 1
    write_text(text, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
