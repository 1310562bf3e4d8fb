"""Tokenizer throughput: encode/decode frames/s (visual) and audio seconds/s, and quantizer lookup
time against a naive `torch.cdist` + argmin.

Quantizer pairs (A = fast path, B = naive reference, alternated in one process, median of per-pair
ratios; an A/A pair gives the noise floor):
- index-codebook VQ: `VectorQuantizer.nearest` (one matmul) vs `cdist` + argmin over the codebook;
- bitwise (lookup-free): the sign test vs `cdist` + argmin over all 2^d codes of {-1, +1}^d, which is
  what an index codebook of the same vocabulary would cost. Both must return the same codes.

Trained visual tokenizers (`--ckpt`, repeatable): their reconstruction quality on fresh moving-shapes
clips (data seed 7; `tools/tokenizer_colour.py`): RGB PSNR, per-channel PSNR, BT.601 Y / CbCr PSNR,
chroma ratio (grey = 0) and chroma error, with encode/decode frames/s of that tokenizer on those clips.
RGB PSNR alone hides a grey reconstruction (issue 10), so quality is never reported without colour.

    python benchmarks/tokenizer_throughput.py            # prints one JSON object
    python benchmarks/tokenizer_throughput.py --quick    # smoke run
    python benchmarks/tokenizer_throughput.py --ckpt A.ckpt --ckpt B.ckpt   # + quality of trained tokenizers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer  # noqa: E402


def _timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_pair(fn_a, fn_b, repeats: int) -> dict:
    """A and B alternately (order flipped every pair); ratio = median over pairs of t_b / t_a (speed-up of A)."""
    ta, tb = alternate(fn_a, fn_b, repeats)
    ratios = [b / a for a, b in zip(ta, tb)]
    return {"speedup": statistics.median(ratios), "speedup_spread": [min(ratios), max(ratios)],
            "ms_fast": 1e3 * statistics.median(ta), "ms_naive": 1e3 * statistics.median(tb)}


def visual_throughput(preset: str, batch: int, latents: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = TokenizerConfig(preset=preset)
    tok = VisualTokenizer(cfg).eval()
    frames = 1 + (latents - 1) * cfg.time_stride
    hw = cfg.scales[-1][0] * cfg.spatial_factor
    video = torch.rand(batch, 3, frames, hw, hw) * 2 - 1
    tokens = tok.encode(video)
    with torch.inference_mode():
        t_enc = _timeit(lambda: tok.encode(video), repeats)
        t_dec = _timeit(lambda: tok.decode(tokens), repeats)
    n = batch * frames
    return {"preset": preset, "frames": frames, "size": hw, "batch": batch, "scales": [list(s) for s in cfg.scales],
            "bits_per_token": cfg.dim, "tokens_per_clip": sum(h * w for h, w in cfg.scales) * tokens[0].shape[1],
            "encode_frames_per_s": n / t_enc, "decode_frames_per_s": n / t_dec}


def trained_quality(ckpt: str, clips: int, repeats: int) -> dict:
    """A trained visual tokenizer on `clips` fresh clips (3 latent frames of a video tokenizer; first frames for
    an image tokenizer): quality with colour, from all scales, and encode/decode frames/s."""
    from lit_modules.visual_tokenizer import load_visual_tokenizer
    from tools.tokenizer_colour import scale_metrics, tokenizer_input

    tok = load_visual_tokenizer(ckpt)
    cfg = tok.cfg
    frames = 1 + 2 * cfg.time_stride if cfg.video else 1
    size = cfg.scales[-1][0] * cfg.spatial_factor
    x = tokenizer_input(tok, clips, frames, size, seed=7)
    quality = scale_metrics(tok, x)[-1]
    with torch.inference_mode():
        tokens = tok.encode(x)
        t_enc = _timeit(lambda: tok.encode(x), repeats)
        t_dec = _timeit(lambda: tok.decode(tokens), repeats)
    keys = ("psnr", "psnr_r", "psnr_g", "psnr_b", "psnr_y", "psnr_cbcr", "chroma_ratio", "chroma_error", "chroma_real")
    return {"checkpoint": ckpt, "video": cfg.video, "frames": frames, "size": size, "clips": clips,
            **{k: quality[k] for k in keys},
            "encode_frames_per_s": clips * frames / t_enc, "decode_frames_per_s": clips * frames / t_dec}


def audio_throughput(preset: str, batch: int, seconds: float, repeats: int) -> dict:
    from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig, MuLawTokenizer

    torch.manual_seed(0)
    cfg = AudioTokenizerConfig(preset=preset)
    tok = AudioTokenizer(cfg).eval()
    wave = torch.rand(batch, int(seconds * cfg.sample_rate)) * 2 - 1
    with torch.inference_mode():
        codes = tok.encode(wave)
        t_enc = _timeit(lambda: tok.encode(wave), repeats)
        t_dec_mel = _timeit(lambda: tok.decode(codes), repeats)
        t_dec_wave = _timeit(lambda: tok.decode_wave(codes), max(1, repeats // 2))
        mulaw = MuLawTokenizer()
        t_mu = _timeit(lambda: mulaw.decode(mulaw.encode(wave)), repeats)
    audio_s = batch * seconds
    return {"preset": preset, "batch": batch, "clip_seconds": seconds, "codes_shape": list(codes.shape),
            "encode_audio_s_per_s": audio_s / t_enc, "decode_to_mel_audio_s_per_s": audio_s / t_dec_mel,
            "decode_to_wave_griffin_lim_audio_s_per_s": audio_s / t_dec_wave,
            "mulaw_round_trip_audio_s_per_s": audio_s / t_mu}


def quantizer_lookup(n: int, dim: int, codebook: int, bits: int, n_bits: int, repeats: int) -> dict:
    from models.tokenizers.vq import VectorQuantizer, nearest_reference

    torch.manual_seed(0)
    x = torch.randn(n, dim)
    vq = VectorQuantizer(codebook, dim, l2_normalize=False, ema=False).eval()
    book = vq.lookup(torch.arange(codebook))
    assert torch.equal(vq.nearest(x), nearest_reference(x, book)), "matmul VQ search disagrees with cdist"
    vq_pair = bench_pair(lambda: vq.nearest(x), lambda: nearest_reference(x, book), repeats)
    vq_aa = bench_pair(lambda: vq.nearest(x), lambda: vq.nearest(x), repeats)

    xb = torch.randn(n_bits, bits)  # fewer vectors: the naive side materialises n_bits x 2^bits distances
    weights = 2 ** torch.arange(bits - 1, -1, -1)
    all_codes = ((torch.arange(2 ** bits)[:, None] // weights) % 2).float() * 2 - 1  # [2^bits, bits]

    def sign_lookup():
        return ((xb > 0).long() * weights).sum(-1)

    def naive_lookup():
        return torch.cdist(xb, all_codes).argmin(-1)

    assert torch.equal(sign_lookup(), naive_lookup()), "sign lookup disagrees with the exhaustive search"
    bit_pair = bench_pair(sign_lookup, naive_lookup, repeats)
    return {"vq": {"vectors": n, "dim": dim, "codebook": codebook, **vq_pair,
                   "aa_speedup": vq_aa["speedup"], "aa_spread": vq_aa["speedup_spread"]},
            "bitwise": {"vectors": n_bits, "bits": bits, "implicit_codebook": 2 ** bits, **bit_pair}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    p.add_argument("--ckpt", action="append", default=[], help="a trained visual tokenizer: report its quality (repeatable)")
    p.add_argument("--clips", type=int, default=32, help="fresh clips for --ckpt quality")
    args = p.parse_args(argv)
    for ckpt in args.ckpt:
        if not Path(ckpt).is_file():
            p.error(f"--ckpt {ckpt}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        out = {
            "visual": [visual_throughput("tiny", 2, 3, 2)],
            "audio": [audio_throughput("tiny", 2, 0.5, 2)],
            "lookup": quantizer_lookup(512, 16, 256, 10, 256, 3),
        }
    else:
        out = {
            "visual": [visual_throughput("tiny", 8, 3, args.repeats), visual_throughput("small", 8, 3, args.repeats)],
            "audio": [audio_throughput("tiny", 8, 1.0, args.repeats), audio_throughput("small", 8, 1.0, args.repeats)],
            "lookup": quantizer_lookup(16384, 32, 4096, 16, 2048, args.repeats),
        }
    if args.ckpt:
        out["trained"] = [trained_quality(c, 2 if args.quick else args.clips, 2 if args.quick else args.repeats)
                          for c in args.ckpt]
    out["config"] = {"quick": args.quick, "repeats": args.repeats, "threads": torch.get_num_threads()}
    out["torch"] = torch.__version__
    out["device"] = "cpu"
    out["machine"] = platform.machine()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
