"""Data-parallel training (torchrun/DDP) on 2 CPU processes with gloo keeps every rank's learned state identical."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stepwise.config import TrainConfig, parse
from stepwise.data import make_synthetic
from stepwise.diffusion import Diffusion
from stepwise.models import build_model
from stepwise.training import train

MODEL = dict(name="unet", base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])


def worker(rank: int, world: int, init: str, out_dir: str, steps: int, mixing: str = "loss_based") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        images = make_synthetic(num_train=64)["splits"]["train"][0]
        cfg = parse(TrainConfig, dict(steps=steps, batch_size=16, ckpt_every=4, log_every=2, device="cpu",
                                      timestep_sampler="iddpm", timestep_sampler_args={"history_per_term": 1},
                                      momentum_decay="demon", momentum_decay_args={"total_steps": 8}), "train")
        d = Diffusion("linear", 20, "mixed_x0", mixing=mixing)
        r = train(build_model(MODEL, 16, 1, out_channels=3), d, images, cfg, f"{out_dir}/ckpt", fingerprint="ddp",
                  progress=False)
        sampler_state = {k: v for k, v in r["sampler"].state_dict().items() if k != "generator"}
        torch.save({"model": r["model"].state_dict(), "sampler": sampler_state, "mixing": d.state_dict(),
                    "history": r["history"], "resumed_from": r["resumed_from"]}, f"{out_dir}/rank{rank}_{steps}.pt")
    finally:
        dist.destroy_process_group()


def launch(tmp_path, steps: int, tag: str, mixing: str = "loss_based") -> list[dict]:
    init = f"file://{tmp_path}/rendezvous_{tag}"
    mp.spawn(worker, args=(2, init, str(tmp_path), steps, mixing), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}_{steps}.pt", weights_only=False) for r in range(2)]


def test_two_process_gloo_ranks_agree_and_resume(tmp_path):
    a, b = launch(tmp_path, 4, "a")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    assert a["sampler"]["history"].shape[0] == 20 and torch.equal(a["sampler"]["history"], b["sampler"]["history"])
    assert torch.equal(a["sampler"]["counts"], b["sampler"]["counts"]) and int(a["sampler"]["counts"].sum()) > 0
    for key, value in a["mixing"].items():
        torch.testing.assert_close(b["mixing"][key], value, rtol=0, atol=0)
    assert a["history"] == b["history"] and len(a["history"]) == 2
    # resume the 2-process run from its step-4 checkpoint: both ranks continue from there
    c, d = launch(tmp_path, 8, "b")
    assert c["resumed_from"] == d["resumed_from"] == 4
    ckpt = torch.load(next((tmp_path / "ckpt").glob("step_00000008.pt")), weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["sampler"]) == 2


def test_learned_mixing_logits_are_identical_on_both_ranks(tmp_path):
    """The learned route-mixing logits live outside the DDP wrapper: their gradients are averaged by hand."""
    a, b = launch(tmp_path, 4, "learned", mixing="learned")
    logits = [k for k in a["mixing"] if "logit" in k]
    assert logits
    for key in logits:
        torch.testing.assert_close(b["mixing"][key], a["mixing"][key], rtol=0, atol=0)
    assert any(float(a["mixing"][k].abs().sum()) > 0 for k in logits)  # they did train
