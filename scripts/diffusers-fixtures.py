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


def lora_round_trip(name):
    """The other direction: a LoRA tilt wrote (kernels/examples/diffusers_lora_fixture.rs) loaded
    into diffusers' model with PEFT, as diffusers' own LoRA loader does, and diffusers' output with
    it on the fixture's inputs. UNet2DModel has no load_lora_adapter (no PeftAdapterMixin), so the
    adapter is injected with peft directly, from the file's lora_adapter_metadata."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = os.path.join(ROOT, name)
    f = os.path.join(d, "lora-tilt", "pytorch_lora_weights.safetensors")
    if not os.path.exists(f):
        print(f"{name}: no lora-tilt/ (run cargo run --release -p tilt-kernels --example diffusers_lora_fixture first)")
        return
    with safe_open(f, framework="pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    cfg = LoraConfig(r=meta["unet.r"], lora_alpha=meta["unet.lora_alpha"], target_modules=meta["unet.target_modules"])
    model = UNet2DModel.from_pretrained(d)
    model.eval()
    inject_adapter_in_model(cfg, model)
    sd = {k[len("unet."):]: v for k, v in load_file(f).items()}
    res = set_peft_model_state_dict(model, sd)
    if res.unexpected_keys:
        raise SystemExit(f"{name}: diffusers/peft did not take {res.unexpected_keys[:5]}")
    missing = [k for k in res.missing_keys if "lora" in k]
    if missing:
        raise SystemExit(f"{name}: the LoRA file lacks {missing[:5]}")
    inp = load_file(os.path.join(d, "inputs.safetensors"))
    kwargs = {"class_labels": inp["class_labels"]} if "class_labels" in inp else {}
    with torch.no_grad():
        y = model(inp["sample"], inp["timestep"], **kwargs).sample
        base = UNet2DModel.from_pretrained(d).eval()(inp["sample"], inp["timestep"], **kwargs).sample
    save_file({"sample": y.contiguous()}, os.path.join(d, "lora-tilt", "outputs.safetensors"))
    print(f"{name}: tilt's LoRA loaded into diffusers ({len(sd)} tensors, r {cfg.r}, alpha {cfg.lora_alpha}); "
          f"it moves the output by {(y - base).abs().max():.4f}")


def merged_round_trip(name):
    """diffusers loads the directory `tilt model merge` writes (target/release/tilt, when built), and
    its output equals diffusers' own output with the LoRA injected (lora_round_trip)."""
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    tilt = os.path.join(ROOT, "..", "..", "..", "target", "release", "tilt")
    d = os.path.join(ROOT, name)
    want_file = os.path.join(d, "lora-tilt", "outputs.safetensors")
    if not (os.path.exists(tilt) and os.path.exists(want_file)):
        print(f"{name}: merge check skipped (needs target/release/tilt and lora-tilt/outputs.safetensors)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "merged")
        subprocess.run([tilt, "model", "merge", d, "--lora", os.path.join(d, "lora-tilt"), "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
        model = UNet2DModel.from_pretrained(out).eval()
        inp = load_file(os.path.join(d, "inputs.safetensors"))
        with torch.no_grad():
            y = model(inp["sample"], inp["timestep"]).sample
    err = (y - load_file(want_file)["sample"]).abs().max().item()
    print(f"{name}: diffusers on `tilt model merge`'s directory against diffusers + the LoRA: max error {err:.2e}")


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
    lora_round_trip("unet2d")
    merged_round_trip("unet2d")


if __name__ == "__main__":
    main()
