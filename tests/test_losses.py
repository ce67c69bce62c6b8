"""The objective's pure helpers against values computed by hand."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from lora_cli.diffusion.losses import min_snr_weights, prediction_target, sample_noise, snr, weighted_mse
from lora_cli.training.data import prepare_caption


def test_targets_follow_the_prediction_type() -> None:
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(prediction_target("epsilon", scheduler, latents, noise, t), noise)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target("v_prediction", scheduler, latents, noise, t), expected)


def test_min_snr_weights() -> None:
    values = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weights(values, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weights(values, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    alphas = torch.tensor([0.8, 0.5])
    torch.testing.assert_close(snr(alphas, torch.tensor([0, 1])), torch.tensor([4.0, 1.0]))


def test_weighted_mse_and_offset_noise() -> None:
    prediction, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert weighted_mse(prediction, target, None).item() == 2.5
    assert weighted_mse(prediction, target, torch.tensor([1.0, 0.0])).item() == 0.5
    plain = sample_noise((64, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise((64, 4, 8, 8), 1.0, torch.Generator().manual_seed(0))
    # Offset noise adds one constant per (sample, channel): the per-channel means spread out.
    assert offset.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()


def test_caption_dropout_and_tag_shuffle() -> None:
    generator = torch.Generator().manual_seed(0)
    captions = [prepare_caption("sks, dog, red, grass", True, 1, 0.0, generator) for _ in range(20)]
    assert all(c.startswith("sks, ") and sorted(c.split(", ")) == ["dog", "grass", "red", "sks"] for c in captions)
    assert len(set(captions)) > 1
    dropped = [prepare_caption("a dog", False, 0, 0.5, generator) for _ in range(200)]
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", "a dog"}
