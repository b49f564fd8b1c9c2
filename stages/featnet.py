"""DVC stage `featnet`: train the dataset's own feature network for offline FID (metric names `*_featnet`)."""
from __future__ import annotations

import logging
from dataclasses import asdict

from stepwise.data import load_split
from stepwise.featnet import save_featnet, train_featnet
from stepwise.tracking import stage_run
from stepwise.distributed import resolve_device

from .common import ARTIFACTS, add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.featnet")


def main(args, config) -> None:
    cfg = config.eval.featnet
    images, labels, classes = load_split(f"{args.data}/train.pt")
    test_images, test_labels, _ = load_split(f"{args.data}/test.pt")
    with stage_run("featnet", config.raw, {"eval.featnet": asdict(cfg)}) as run:
        net, acc = train_featnet(images, labels, test_images, test_labels, len(classes), cfg,
                                 device=resolve_device("auto"))
        save_featnet(net.cpu(), args.out, {"test_accuracy": acc, "classes": classes})
        report_metrics(run, {"featnet_test_accuracy": acc}, args.metrics, log)
        run.log_artifact(args.out)


def configure(parser) -> None:
    add_paths(parser, "data", out=ARTIFACTS["featnet"], metrics="metrics/featnet.json")


if __name__ == "__main__":
    run_stage("featnet", main, configure)
