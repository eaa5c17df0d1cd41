"""freezeguard.integrations.diffusers loss + pipeline loading: hand-computed DDPM losses, epsilon vs v, latent path."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from support.tiny_models import build_tiny_sd_pipeline  # noqa: E402

from freezeguard.integrations.diffusers import PipelineError, load_components, make_loss_fn, save_pipeline_with_unet  # noqa: E402


def _pixel_unet(in_channels: int = 3) -> UNet2DConditionModel:
    torch.manual_seed(1)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=in_channels,
                                layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=8,
                                cross_attention_dim=12, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _hand_loss(unet, sched, x0, noise, t, ehs, prediction_type):
    acp = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
    target = noise if prediction_type == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * x0
    pred = unet(noisy, t, encoder_hidden_states=ehs).sample
    return ((pred - target) ** 2).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd", seed=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pixel_space_matches_hand_computation(prediction_type):
    unet = _pixel_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    noise, t, ehs = torch.randn(3, 3, 8, 8), torch.tensor([5, 400, 999]), torch.randn(3, 4, 12)
    batch = {"pixel_values": x0, "noise": noise, "timesteps": t, "encoder_hidden_states": ehs,
             "is_target": torch.tensor([True, False, True])}
    got = make_loss_fn(sched)(unet, batch)
    want = _hand_loss(unet, sched, x0, noise, t, ehs, prediction_type)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert batch["is_target"].tolist() == [True, False, True]  # passed through untouched


def test_epsilon_and_v_targets_differ():
    unet = _pixel_unet()
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    batch = {"pixel_values": x0, "noise": noise, "timesteps": torch.tensor([700, 900]),
             "encoder_hidden_states": torch.randn(2, 4, 12)}
    eps = make_loss_fn(DDPMScheduler(prediction_type="epsilon"))(unet, batch)
    v = make_loss_fn(DDPMScheduler(prediction_type="v_prediction"))(unet, batch)
    assert not torch.allclose(eps, v)


def test_randomness_from_generator_or_global_rng():
    unet = _pixel_unet()
    loss_fn = make_loss_fn(DDPMScheduler())
    base = {"pixel_values": torch.zeros(2, 3, 8, 8), "encoder_hidden_states": torch.randn(2, 4, 12)}
    a = loss_fn(unet, {**base, "generator": torch.Generator().manual_seed(3)})
    b = loss_fn(unet, {**base, "generator": torch.Generator().manual_seed(3)})
    c = loss_fn(unet, base)
    d = loss_fn(unet, base)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(c, d)


def test_gradients_reach_the_unet():
    unet = _pixel_unet()
    batch = {"pixel_values": torch.rand(2, 3, 8, 8), "encoder_hidden_states": torch.randn(2, 4, 12)}
    make_loss_fn(DDPMScheduler())(unet, batch).mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_bad_inputs_give_clear_errors():
    unet = _pixel_unet()
    with pytest.raises(ValueError, match="prediction_type"):
        make_loss_fn(DDPMScheduler(prediction_type="sample"))
    loss_fn = make_loss_fn(DDPMScheduler())
    with pytest.raises(KeyError, match="pixel_values"):
        loss_fn(unet, {"encoder_hidden_states": torch.randn(1, 4, 12)})
    with pytest.raises(ValueError, match="text_encoder"):
        loss_fn(unet, {"pixel_values": torch.rand(1, 3, 8, 8), "input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="timesteps"):
        loss_fn(unet, {"pixel_values": torch.rand(2, 3, 8, 8), "encoder_hidden_states": torch.randn(2, 4, 12),
                       "timesteps": torch.tensor([1, 2, 3])})


def test_latent_path_with_tiny_vae_and_text_encoder(tiny_pipe):
    comps = load_components(tiny_pipe)
    assert type(comps.noise_scheduler).__name__ == "DDPMScheduler"
    assert comps.vae is not None and comps.text_encoder is not None and comps.tokenizer is not None
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = comps.tokenizer(["a photo of sks", "a dog"], padding="max_length", truncation=True,
                          max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
    noise, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 800])
    loss_fn = make_loss_fn(comps.noise_scheduler, vae=comps.vae, text_encoder=comps.text_encoder)
    got = loss_fn(comps.unet, {"pixel_values": x0, "input_ids": ids, "noise": noise, "timesteps": t})
    with torch.no_grad():
        latents = comps.vae.encode(x0).latent_dist.mode() * comps.vae.config.scaling_factor
        ehs = comps.text_encoder(ids)[0]
        want = _hand_loss(comps.unet, comps.noise_scheduler, latents, noise, t, ehs, "epsilon")
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # precomputed latents / hidden states give the same loss
    same = make_loss_fn(comps.noise_scheduler)(comps.unet, {"latents": latents, "encoder_hidden_states": ehs,
                                                             "noise": noise, "timesteps": t})
    torch.testing.assert_close(same.detach(), want, rtol=1e-5, atol=1e-6)
    # the VAE and text encoder are frozen: only the UNet receives gradients
    got.sum().backward()
    assert all(p.grad is None for p in comps.vae.parameters())
    assert all(p.grad is None for p in comps.text_encoder.parameters())


def test_save_pipeline_with_unet_round_trip(tiny_pipe, tmp_path):
    comps = load_components(tiny_pipe)
    with torch.no_grad():
        for p in comps.unet.parameters():
            p.add_(0.5)
    out = save_pipeline_with_unet(tiny_pipe, tmp_path / "ft", comps.unet)
    back = load_components(out)
    for (n, a), (_, b) in zip(comps.unet.state_dict().items(), back.unet.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    orig = load_components(tiny_pipe)
    torch.testing.assert_close(orig.vae.state_dict(), back.vae.state_dict())
    assert not torch.equal(next(orig.unet.parameters()), next(back.unet.parameters()))
    with pytest.raises(PipelineError, match="overwrite"):
        save_pipeline_with_unet(tiny_pipe, tiny_pipe, comps.unet)


def test_load_components_bad_folders(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_components(tmp_path / "nope")
    with pytest.raises(PipelineError, match="unet/config.json"):
        load_components(tmp_path)
