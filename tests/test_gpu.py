"""CUDA: one peer training on its GPU, two peers summing CUDA tensors with gloo (they may share a GPU;
NCCL refuses two ranks on one), and the CUDA RNG state in per-rank checkpoints. Skipped without CUDA."""
import pytest
import torch

from p2prl import checkpoint
from p2prl.comm import open_comm
from p2prl.runner import run

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TINY = ("algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        "train.total_steps=256", "train.target_return=null", "train.log_every_steps=64")


def test_one_peer_trains_on_its_gpu(tmp_path, compose):
    summary = run(compose("device=cuda", *TINY), tmp_path / "run")
    saved = checkpoint.load(checkpoint.shared_path(tmp_path / "run" / "checkpoints", summary["final_step"]))
    own = checkpoint.load(checkpoint.rank_path(tmp_path / "run" / "checkpoints", 0, summary["final_step"]))
    assert summary["final_step"] == 256 and saved["model"] and "cuda" in own["rng"]


def _gloo_over_cuda(rank: int, cfg):
    comm = open_comm(cfg, "gloo", device="cuda")
    x = torch.full((1000,), float(rank + 1), device=comm.device)
    comm.all_reduce_sum(x)
    return x.cpu(), str(comm.device)


def test_two_peers_sum_cuda_tensors_with_gloo(compose, peers):
    out = peers(_gloo_over_cuda, 2, compose("comm.timeout_s=60").comm)
    for total, device in out:
        assert device.startswith("cuda") and torch.equal(total, torch.full((1000,), 3.0))


def test_the_cuda_rng_state_round_trips(tmp_path):
    torch.cuda.init()
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    want = torch.rand(3, device="cuda")
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), want)
