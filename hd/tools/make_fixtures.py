"""Write the small PyTorch reference outputs under tests/fixtures/ that CI checks hd's ports against, without
torch. Needs `pip install torch diffusers` (neither is in requirements.txt):

    python -m hd.tools.make_fixtures --out=tests/fixtures            # every fixture
    python -m hd.tools.make_fixtures --out=tests/fixtures --only=vae  # one of: sit, vae
"""

from __future__ import annotations

import argparse
import math
import os


# --- SiT: a small SiT-structured network with every weight random --------------------------------------------

# hd's "tiny" DiT size on 8x8x4 latents with 10 classes (+ the null class 10), learn_sigma=True as released.
_SIT_CONFIG = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                   mlp_ratio=4.0, num_classes=10)
# hd times (data at t = 0); the SiT network is evaluated at 1 - t. Both ends and values next to them.
_SIT_TIMES = (0.0, 0.001, 0.3, 0.5, 0.7, 0.999, 1.0)


def _sincos_positions(dim: int, grid: int):
    """Fixed 2-D sin-cos positions [grid*grid, dim] of the SiT/MAE recipe: half the channels encode the column
    (w), half the row; within each half, sines of every frequency then cosines."""
    import numpy as np

    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    halves = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = pos[:, None] * omega[None]
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    return np.concatenate(halves, axis=1)


def _tiny_sit(torch, *, input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio,
              num_classes):
    """A SiT with the official module names and forward pass (patch embedding, fixed positions, timestep and
    label embedders, adaLN-Zero blocks, final adaLN layer, 2C outputs), written here from its structure."""
    nn, F = torch.nn, torch.nn.functional

    class TimestepEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

        def forward(self, t):
            # SiT feeds t in [0, 1] unscaled; cos features first, frequencies exp(-ln(1e4) k / 128).
            freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
            args = t[:, None].float() * freqs[None]
            return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    class LabelEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes: null class

        def forward(self, y):
            return self.embedding_table(y)

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
            self.proj = nn.Linear(hidden_size, hidden_size)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // num_heads), dim=-1)
            return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
            self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def modulate(x, shift, scale):
        return x * (1 + scale[:, None]) + shift[:, None]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp()
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

        def forward(self, x, c):
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
            return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))

    class FinalLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.linear = nn.Linear(hidden_size, patch_size * patch_size * 2 * in_channels)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

        def forward(self, x, c):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))

    class SiT(nn.Module):
        def __init__(self):
            super().__init__()
            grid = input_size // patch_size
            self.x_embedder = PatchEmbed()
            self.t_embedder = TimestepEmbedder()
            self.y_embedder = LabelEmbedder()
            self.pos_embed = nn.Parameter(
                torch.from_numpy(_sincos_positions(hidden_size, grid)).float()[None], requires_grad=False)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.final_layer = FinalLayer()

        def forward(self, x, t, y):
            """x [N, C, H, W], t [N] (SiT time: data at 1), y [N] -> [N, 2C, H, W] (velocity, then sigma)."""
            tokens = self.x_embedder(x) + self.pos_embed
            c = self.t_embedder(t) + self.y_embedder(y)
            for block in self.blocks:
                tokens = block(tokens, c)
            out = self.final_layer(tokens, c)
            n, grid, p, ch = x.shape[0], input_size // patch_size, patch_size, 2 * in_channels
            out = out.reshape(n, grid, grid, p, p, ch)  # the official unpatchify: (p, q, c) per token
            return torch.einsum("nhwpqc->nchpwq", out).reshape(n, ch, grid * p, grid * p)

    return SiT()


def write_sit_fixture(out_dir: str) -> None:
    """tests/fixtures/sit_tiny/: the random SiT's state dict as sit_tiny.safetensors and as a REPA-style
    sit_tiny_nested.pt ({'ema': state dict + an extra 'projectors.0.weight'}), and io.npz with the inputs
    (z NHWC, hd time t, SiT time t_sit = 1 - t, labels y) and the SiT outputs `v_sit` (NHWC, all 2C channels).
    Rows i and i + len(times) share z and t; the second has the null label (for CFG checks)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = _SIT_CONFIG
    model = _tiny_sit(torch, **cfg).eval()
    # Every weight random (no zero adaLN or output layers): N(0, 1/fan_in) matrices, N(0, 0.1^2) vectors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 0
            std = 1.0 if name.startswith("y_embedder") else (1 / math.sqrt(fan_in) if fan_in else 0.1)
            p.copy_(torch.randn(p.shape) * std)

    times = np.asarray(_SIT_TIMES, np.float32)
    k = len(times)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((k, cfg["input_size"], cfg["input_size"], cfg["in_channels"])).astype(np.float32)
    z = np.concatenate([z, z])
    t = np.concatenate([times, times])
    y = np.concatenate([np.arange(k) % cfg["num_classes"], np.full(k, cfg["num_classes"])]).astype(np.int32)
    t_sit = (1.0 - torch.from_numpy(t)).float()
    with torch.no_grad():
        out = model(torch.from_numpy(z).permute(0, 3, 1, 2), t_sit, torch.from_numpy(y).long())
    v_sit = out.permute(0, 2, 3, 1).numpy()

    folder = os.path.join(out_dir, "sit_tiny")
    os.makedirs(folder, exist_ok=True)
    state = {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}
    save_file(state, os.path.join(folder, "sit_tiny.safetensors"))
    nested = dict(state, **{"projectors.0.weight": torch.randn(8, cfg["hidden_size"])})
    torch.save({"ema": nested}, os.path.join(folder, "sit_tiny_nested.pt"))
    np.savez(os.path.join(folder, "io.npz"), z=z, t=t, t_sit=t_sit.numpy(), y=y, v_sit=v_sit)
    print(f"wrote {folder}: {sum(v.numel() for v in state.values())} weights, outputs {v_sit.shape}, "
          f"|v_sit| rms {float(np.sqrt((v_sit ** 2).mean())):.3f}")


# --- SD-VAE: diffusers.AutoencoderKL at a tiny random config --------------------------------------------------

# Two blocks with a down/upsampler between them, quant convs and mid-block attention: every layer kind of the
# SD-VAE, at widths small enough that weights and outputs fit in 0.7 MB.
VAE_FIXTURE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                   norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, act_fn="silu", sample_size=16, scaling_factor=0.18215)
VAE_FIXTURE_BATCH = 2
VAE_FIXTURE_SIZE = 16


def _perturb_vae(torch, model) -> None:
    """Every weight random, none trivially 0 or 1: N(0, 1/fan_in) kernels (q and k at 2x, so attention is far
    from uniform), norm scales 1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    import re

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                gain = 2.0 if re.search(r"\.(to_q|to_k)\.", name) else 1.0
                p.copy_(torch.randn(p.shape) * gain / math.sqrt(p[0].numel()))
            elif re.search(r"norm[^.]*\.weight$", name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            else:
                p.copy_(0.1 * torch.randn(p.shape))


def write_vae_fixture(out_dir: str) -> None:
    """tests/fixtures/vae_tiny/: a diffusers AutoencoderKL at VAE_FIXTURE with perturbed random weights, saved
    with save_pretrained (config.json + diffusion_pytorch_model.safetensors), and io.npz with, all NHWC float32:
    `images` in [-1, 1] and the encoder posterior's `mean` and `std`; `latents` ~ N(0, 1) and the decoder
    output `decoded` for them. Built in a temporary folder and moved in place at the end."""
    import shutil
    import tempfile

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**VAE_FIXTURE).eval()
    _perturb_vae(torch, model)
    rng = np.random.default_rng(0)
    n, size, f = VAE_FIXTURE_BATCH, VAE_FIXTURE_SIZE, 2 ** (len(VAE_FIXTURE["block_out_channels"]) - 1)
    images = rng.uniform(-1, 1, (n, size, size, VAE_FIXTURE["in_channels"])).astype(np.float32)
    latents = rng.standard_normal((n, size // f, size // f, VAE_FIXTURE["latent_channels"])).astype(np.float32)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous().numpy()
    with torch.no_grad():
        posterior = model.encode(nchw(images)).latent_dist
        mean, std = nhwc(posterior.mean), nhwc(posterior.std)
        decoded = nhwc(model.decode(nchw(latents)).sample)

    folder = os.path.join(out_dir, "vae_tiny")
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".vae_tiny-")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        np.savez(os.path.join(staging, "io.npz"), images=images, mean=mean, std=std, latents=latents,
                 decoded=decoded)
        # mkdtemp's folder is private (0700): make the fixture readable like the rest of the checkout.
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        os.chmod(staging, 0o755)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {folder}: {count} weights; mean {mean.shape} rms {float(np.sqrt((mean ** 2).mean())):.3f}, "
          f"std range [{std.min():.3f}, {std.max():.3f}], decoded {decoded.shape} max |x| {np.abs(decoded).max():.3f}")


WRITERS = {"sit": write_sit_fixture, "vae": write_vae_fixture}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures", help="output folder")
    parser.add_argument("--only", choices=sorted(WRITERS), action="append", help="write only these fixtures")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or sorted(WRITERS):
        WRITERS[name](args.out)


if __name__ == "__main__":
    main()
