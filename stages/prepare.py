"""DVC stage `prepare`: raw dataset -> data/prepared/{train,test}.pt (uint8) + card.json + a grid of real images."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from stepwise.data import check_images, load_source, save_split
from stepwise.io import write_json
from stepwise.tracking import stage_run
from stepwise.visualise import save_grid

from .common import ARTIFACTS, add_paths, run_stage


def main(args, cfg) -> None:
    data = cfg.data
    source = load_source(asdict(data))  # every read and check happens before anything is written
    for split, (images, labels) in source["splits"].items():
        check_images(images, labels, f"{split} split of {source['source']}", data.image_size, data.channels)
    out = Path(args.out)
    with stage_run("prepare", cfg.raw, {"data": asdict(data)}) as run:
        card = {"name": data.name, "source": source["source"], "classes": source["classes"], "splits": {}}
        for split, (images, labels) in source["splits"].items():
            card["splits"][split] = save_split(out / f"{split}.pt", images, labels, source["classes"])
        write_json(card, out / "card.json")
        save_grid(source["splits"]["train"][0][:64], out / "train_grid.png")
        run.log_metrics({f"{split}_count": c["count"] for split, c in card["splits"].items()})
        run.log_artifact(out / "card.json")
        run.log_artifact(out / "train_grid.png")


def configure(parser) -> None:
    add_paths(parser, out=ARTIFACTS["data"])


if __name__ == "__main__":
    run_stage("prepare", main, configure)
