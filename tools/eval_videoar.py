"""Evaluate a VideoAR checkpoint on held-out clips of its data; prints one JSON object.

    python tools/eval_videoar.py VIDEOAR.ckpt experiment=videoar [--num-clips 64] [--seed 0] [--bootstrap 200]

Metrics (trailing key=value arguments are Hydra overrides selecting the data, as for train.py):
- fd_tokenizer: Frechet distance between Gaussian fits of tokenizer features of generated and real
  clips (class-conditional, the real clips' classes). Features: the frozen tokenizer's encoder
  latent, averaged over space, per latent frame, concatenated over frames. An FVD proxy that needs
  no downloaded network; comparable only between runs sharing the tokenizer and data.
- fd_tokenizer_real_split: the same distance between two halves of the real clips (its floor).
- future PSNR / SSIM per horizon h: given the first latent frame of a real clip, the model
  generates the rest; pixel frames of latent frame h are compared with the real ones.
- bit accuracy and loss per frame under teacher forcing (the drift CFEC targets).
- colour: the tokenizer's reconstruction of the real clips (`tokenizer_colour`: chroma ratio and
  error, per-channel and Y / CbCr PSNR, models/tokenizers/metrics.py), and the chroma of generated
  clips against the real ones (`generated_chroma_ratio`: 0 = grey samples, 1 = as colourful).

The metric's own noise: `ci95` holds a percentile bootstrap 95% interval (`--bootstrap` resamples of
the clips, with replacement; 0 turns it off) of fd_tokenizer (generated and real clips resampled
independently), future PSNR per horizon and bit accuracy per frame (clips resampled). The interval
is what another draw of as many clips would give for this one model; compare its width with the
spread over training seeds before reading a difference between configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure  # noqa: E402

from models.io import atomic_write_text  # noqa: E402


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussian fits of rows of a and b."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD)
    ea, va = torch.linalg.eigh(sa)
    sqrt_a = va @ torch.diag(ea.clamp_min(0).sqrt()) @ va.T
    mid = sqrt_a @ sb @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * tr_sqrt)


def bootstrap_ci(stat, sizes: tuple[int, ...], resamples: int, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of `stat(*index_tensors)`: each call gets one index tensor per entry of
    `sizes`, drawn with replacement from range(size), independently; returns [low, high]."""
    if resamples < 2:
        raise ValueError(f"bootstrap needs at least 2 resamples, got {resamples}")
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([float(stat(*(torch.randint(n, (n,), generator=g) for n in sizes)))
                           for _ in range(resamples)], dtype=torch.float64)
    tail = (1 - level) / 2
    return torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR (data range 1) of the mean of per-clip MSEs: over equal-size clips, the PSNR of the whole set."""
    return 10 * torch.log10(1.0 / mse.double().mean().clamp_min(1e-12))


@torch.no_grad()
def clip_features(tokenizer, video: torch.Tensor) -> torch.Tensor:
    z = tokenizer.encode_features(video)  # [B, d, T', H, W]
    return z.mean(dim=(-2, -1)).flatten(1)


@torch.no_grad()
def evaluate(ckpt: str, overrides: list[str], num_clips: int = 64, seed: int = 0, batch: int = 16,
             device: str = "cpu", bootstrap: int = 200) -> dict:
    from generate import load_videoar
    from tools.tokenize_dataset import compose_data_config

    module = load_videoar(ckpt, device)
    tok = module.tokenizer
    dm = hydra.utils.instantiate(compose_data_config(overrides), _convert_="all")
    dm.setup("fit")
    data = dm.test_dataset if len(dm.test_dataset) else dm.val_dataset
    if len(data) < 4:
        raise ValueError(f"only {len(data)} held-out clips; raise data.num_clips or data.val_fraction")
    n = min(num_clips, len(data))
    real = torch.stack([data[i]["pixels"] for i in range(n)]).to(device)
    labels = torch.tensor([data[i]["label"] for i in range(n)], device=device).clamp_min(0)
    T = tok.cfg.latent_frames(real.shape[2])
    tau = tok.cfg.time_stride
    gen = torch.Generator(device=device).manual_seed(seed)

    fake, cont, recon = [], [], []
    for s in range(0, n, batch):
        lab = labels[s:s + batch]
        _, video = module.generate_clips(lab, T, gen)
        fake.append(video)
        tokens = tok.encode(real[s:s + batch])
        recon.append(tok.decode(tokens))
        _, video = module.generate_clips(lab, T, gen, prefix_tokens=[t[:, :1] for t in tokens])
        cont.append(video)
    fake, cont, recon = torch.cat(fake), torch.cat(cont), torch.cat(recon)

    f_real, f_fake = clip_features(tok, real), clip_features(tok, fake)
    half = n // 2
    out = {"checkpoint": ckpt, "clips": n, "latent_frames": T, "seed": seed,
           "fd_tokenizer": frechet_distance(f_real, f_fake),
           "fd_tokenizer_real_split": frechet_distance(f_real[:half], f_real[half:2 * half]),
           "future_psnr": {}, "future_ssim": {}}
    ci: dict = {}
    if bootstrap:
        f_real_c, f_fake_c = f_real.cpu(), f_fake.cpu()
        ci["fd_tokenizer"] = bootstrap_ci(lambda i, j: frechet_distance(f_real_c[i], f_fake_c[j]),
                                          (n, n), bootstrap, seed)
        ci["future_psnr"] = {}
    unit = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    for h in range(1, T):
        sl = slice(1 + (h - 1) * tau, 1 + h * tau)
        a = unit(cont[:, :, sl]).transpose(1, 2).flatten(0, 1)
        b = unit(real[:, :, sl]).transpose(1, 2).flatten(0, 1)
        out["future_psnr"][h] = float(peak_signal_noise_ratio(a, b, data_range=1.0))
        out["future_ssim"][h] = float(structural_similarity_index_measure(a, b, data_range=1.0))
        if bootstrap:
            mse = (unit(cont[:, :, sl]) - unit(real[:, :, sl])).double().pow(2).flatten(1).mean(1).cpu()
            ci["future_psnr"][h] = bootstrap_ci(lambda i: psnr_from_mse(mse[i]), (n,), bootstrap, seed)

    from models.tokenizers.metrics import chroma, colour_metrics

    out["tokenizer_colour"] = colour_metrics(recon, real)
    out["generated_chroma_ratio"] = chroma(fake) / max(chroma(real), 1e-8)

    # teacher-forced bit accuracy per frame (no corruption)
    from datamodules.batch import VisualBatch

    per_clip = []
    for s in range(0, n, batch):
        b = VisualBatch(real[s:s + batch], labels[s:s + batch], torch.arange(s, min(n, s + batch)))
        res = module._step(b, "eval", corrupt=False)
        correct = (res["logits"].argmax(-1) == res["labels"].long()).float().mean(-1)
        per_clip.append(correct.view(correct.shape[0], T, -1).mean(-1).cpu())
    per_clip = torch.cat(per_clip)  # [n, T]
    out["bit_acc_per_frame"] = per_clip.mean(0).tolist()
    if bootstrap:
        ci["bit_acc_per_frame"] = [bootstrap_ci(lambda i, t=t: per_clip[i, t].mean(), (n,), bootstrap, seed)
                                   for t in range(T)]
        out["ci95"] = {"resamples": bootstrap, **ci}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--num-clips", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the clips for ci95 (0: none)")
    args = p.parse_args(argv)
    if args.bootstrap == 1 or args.bootstrap < 0:
        p.error(f"--bootstrap must be 0 (off) or at least 2, got {args.bootstrap}")
    res = evaluate(args.ckpt, args.overrides, args.num_clips, args.seed, args.batch, args.device, args.bootstrap)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    return res


if __name__ == "__main__":
    main()
