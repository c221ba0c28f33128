"""Model adapters, loading from a folder, and the CLI end to end on tiny settings."""
import numpy as np
import pytest
import torch

import deqir_fast as dq
from deqir_fast import cli
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


def test_cli_demo_end_to_end(tmp_path, capsys):
    rc = cli.main(["demo", "--steps", "4", "--images", "1", "--tasks", "sr2,inpaint_box",
                   "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sr2" in out and "inpaint_box" in out and "PSNR" in out
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert (tmp_path / "convergence.png").stat().st_size > 1000


def test_cli_restore_end_to_end(tmp_path, capsys):
    from PIL import Image
    img = ((heldout_images()[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "clean.png")
    Image.fromarray(img[::2, ::2]).save(tmp_path / "low.png")
    assert cli.main(["restore", str(tmp_path / "clean.png"), "--task", "inpaint_box", "--simulate",
                     "--steps", "4", "--out", str(tmp_path / "a.png"), "--quiet"]) == 0
    assert cli.main(["restore", str(tmp_path / "low.png"), "--task", "sr2", "--steps", "4",
                     "--serial", "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    assert Image.open(tmp_path / "b.png").size == (32, 32)
    assert cli.main(["restore", str(tmp_path / "clean.png"), "--task", "sr4", "--simulate",
                     "--steps", "3", "--optimize-init", "2", "--out", str(tmp_path / "c.png")]) == 0
    assert "initialization optimized over 2 steps" in capsys.readouterr().out
    # clear errors: unreadable file, wrong size, unknown task
    (tmp_path / "junk.png").write_text("not an image")
    assert cli.main(["restore", str(tmp_path / "junk.png"), "--task", "sr2"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert cli.main(["restore", str(tmp_path / "clean.png"), "--task", "sr2"]) == 2
    assert "takes a measurement of 16x16" in capsys.readouterr().err
    assert cli.main(["restore", str(tmp_path / "clean.png"), "--task", "sr3"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli.main(["restore", str(tmp_path / "nope.png"), "--task", "sr2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["restore", str(tmp_path / "low.png"), "--task", "sr2", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
