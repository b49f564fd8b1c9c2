"""DVC stage `featnet`: train the dataset's own feature network for offline FID (metric names `*_featnet`).

Metrics: the network's test accuracy and training seconds. (The real-vs-real FID floor at the evaluation's sample
count is scored by `evaluate`, so that changing eval settings never retrains this network.)
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

from stepwise.data import load_split
from stepwise.distributed import resolve_device
from stepwise.featnet import save_featnet, train_featnet
from stepwise.tracking import stage_run

from .common import ARTIFACTS, add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.featnet")


def main(args, config) -> None:
    cfg = config.eval.featnet
    images, labels, classes = load_split(f"{args.data}/train.pt")
    test_images, test_labels, _ = load_split(f"{args.data}/test.pt")
    device = resolve_device("auto")
    with stage_run("featnet", config.raw, {"eval.featnet": asdict(cfg)}) as run:
        t0 = time.time()
        net, acc = train_featnet(images, labels, test_images, test_labels, len(classes), cfg, device=device)
        seconds = time.time() - t0
        save_featnet(net.cpu(), args.out, {"test_accuracy": acc, "classes": classes})
        report_metrics(run, {"featnet_test_accuracy": acc, "featnet_train_seconds": seconds}, args.metrics, log)
        run.log_artifact(args.out)


def configure(parser) -> None:
    add_paths(parser, "data", out=ARTIFACTS["featnet"], metrics="metrics/featnet.json")


if __name__ == "__main__":
    run_stage("featnet", main, configure)
