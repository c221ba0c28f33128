"""Model adapters and loading from a folder (the command line: tests/test_cli.py)."""
import pytest
import torch

import deqir_fast as dq
from deqir_fast.models import EpsModel, bundled_model, heldout_images, load_unet

diffusers = pytest.importorskip("diffusers")


class LearnedVariance(torch.nn.Module):
    """A network with 2C output channels: eps first, then a variance half."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return torch.cat([self.w * x + t.view(-1, 1, 1, 1) * 1e-3, torch.full_like(x, 7.0)], 1)


def test_learned_variance_keeps_the_eps_half():
    net = LearnedVariance()
    x = torch.randn(3, 3, 4, 4)
    t = torch.tensor([1, 2, 3])
    out = EpsModel(net)(x, t)
    assert out.shape == x.shape
    assert torch.allclose(out, 0.5 * x + t.view(-1, 1, 1, 1) * 1e-3)


def test_half_precision_network_under_float32_state():
    net = LearnedVariance().to(torch.bfloat16)
    x = torch.randn(2, 3, 4, 4)
    out = EpsModel(net)(x, torch.tensor([5, 6]))
    assert out.dtype == torch.float32
    assert torch.allclose(out, 0.5 * x + torch.tensor([5, 6]).view(-1, 1, 1, 1) * 1e-3, atol=2e-2)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def test_micro_batching_gives_the_same_result():
    net = tiny_unet().eval()
    x = torch.randn(7, 3, 8, 8)
    t = torch.randint(0, 1000, (7,))
    with torch.no_grad():
        whole = EpsModel(net)(x, t)
        split = EpsModel(net, max_batch=3)(x, t)
    assert torch.allclose(whole, split, atol=1e-5)
    with pytest.raises(ValueError, match="max_batch"):
        EpsModel(net, max_batch=0)


def test_load_unet_from_folder_and_solve(tmp_path):
    net = tiny_unet()
    net.save_pretrained(tmp_path / "m")
    model = load_unet(tmp_path / "m", max_batch=16)
    sched = dq.Schedule.linear(1000)
    chain = dq.DDIM(sched, dq.timesteps(sched, 6))
    x_T = torch.randn(2, 3, 8, 8)
    serial = dq.sample_serial(model, chain, x_T)
    res = dq.solve(model, chain, x_T, tol=1e-6)
    assert (res.x0 - serial).abs().max() < 2 / 255
    with pytest.raises(ValueError, match="config.json"):
        load_unet(tmp_path / "missing")


def test_bundled_model_and_images_load():
    model = bundled_model()
    images = heldout_images()
    assert images.shape[1:] == (3, 32, 32) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        eps = model(images[:2], torch.tensor([10, 900]))
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()
