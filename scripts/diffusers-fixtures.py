#!/usr/bin/env python3
"""Parity fixtures for tilt's diffusers-format readers (issue 26, docs/your-own-model.md).

Builds tiny random diffusers models and schedulers with fixed seeds, runs diffusers itself on
fixed inputs, and writes models, inputs and diffusers' outputs under tests/fixtures/diffusers/
(committed; CI compares tilt against them without torch). Run it in its own virtual environment
(torch from PyPI is ~3 GB with its CUDA libraries; everything runs on the CPU):

    python3 -m venv .venv-diffusers
    .venv-diffusers/bin/pip install -r scripts/diffusers-fixtures.requirements.txt
    .venv-diffusers/bin/python scripts/diffusers-fixtures.py

The outputs are deterministic for these pinned versions on one machine (torch.manual_seed, one
thread); rerunning rewrites the same files up to the last bits of float arithmetic.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import DDIMScheduler, UNet2DModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "diffusers")
torch.set_num_threads(1)


def randomise(model, seed):
    """Random weights of moderate size everywhere (diffusers zero-initialises nothing here, but a
    fresh GroupNorm is the identity: random affine parameters exercise the weight loading)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))  # a norm's scale
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))  # biases, a norm's shift
            else:
                fan_in = p[0].numel()  # Linear [out, in], Conv [out, in, kh, kw], Embedding [n, d]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def write_unet2d(name, config, seed, with_classes):
    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    randomise(model, seed)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    size = config["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    b = 3
    sample = torch.randn((b, config["in_channels"], h, w), generator=g)
    timestep = torch.tensor([0, 417, 999], dtype=torch.int64)
    inputs = {"sample": sample, "timestep": timestep}
    kwargs = {}
    if with_classes:
        labels = torch.tensor([0, 2, 1], dtype=torch.int64)
        inputs["class_labels"] = labels
        kwargs["class_labels"] = labels
    with torch.no_grad():
        y = model(sample, timestep, **kwargs).sample
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    save_file({"sample": y.contiguous()}, os.path.join(out, "outputs.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, output scale {y.abs().max():.3f}")


def write_scheduler(name, config, steps, eta, seed):
    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    s = DDIMScheduler(**config)
    s.save_config(out)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    ts = s.timesteps.tolist()
    picks = [0, len(ts) // 2, len(ts) - 1]
    tensors = {"timesteps": s.timesteps.to(torch.int64), "alphas_cumprod": s.alphas_cumprod}
    for i in picks:
        t = ts[i]
        x = torch.randn((2, 3), generator=g)
        o = torch.randn((2, 3), generator=g)
        z = torch.randn((2, 3), generator=g)
        prev = s.step(o, t, x, eta=eta, variance_noise=z).prev_sample
        for k, v in {"sample": x, "model_output": o, "noise": z, "prev_sample": prev}.items():
            tensors[f"step{i}.{k}"] = v
    save_file(tensors, os.path.join(out, "steps.safetensors"))
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump({"steps": steps, "eta": eta, "picks": picks}, f, indent=2)
    print(f"{name}: {steps} steps, eta {eta}, timesteps {ts[0]}..{ts[-1]}")


def main():
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}", file=sys.stderr)
    small = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    write_unet2d("unet2d", small, 11, False)
    write_unet2d(
        "unet2d-class",
        dict(
            small,
            in_channels=1,
            out_channels=1,
            sample_size=(8, 12),
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
            attention_head_dim=None,
            num_class_embeds=3,
            freq_shift=1,
            flip_sin_to_cos=False,
        ),
        12,
        True,
    )
    write_scheduler(
        "scheduler-sd",
        dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
             steps_offset=1, clip_sample=False),
        50, 1.0, 21)
    write_scheduler(
        "scheduler-v-trailing",
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
             clip_sample=False),
        20, 0.5, 22)


if __name__ == "__main__":
    main()
