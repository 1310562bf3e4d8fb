"""Sample from a trained checkpoint: text (language models, ERNIE 3.0's NLG module), video (VideoAR), or
any-to-any with ERNIE 5.0 (`--task`).

    python generate.py logs/train/runs/<run>/checkpoints/last.ckpt --prompt "Mira Okafor was born" -n 3
    python generate.py VIDEOAR.ckpt --classes 0 5 7 --frames 3 --out samples/ --format gif
    python generate.py VIDEOAR.ckpt --continue-from clip.mp4 --classes 4 --frames 8 --out samples/

    python generate.py ERNIE5.ckpt --task image --prompt "a large red circle in the centre, on a plain background"
    python generate.py ERNIE5.ckpt --task image --prompt "..." --refiner REFINER.ckpt   # + the diffusion refiner (2x)
    python generate.py ERNIE5.ckpt --task video --prompt "a large blue square moves slowly upward, over ..."
    python generate.py ERNIE5.ckpt --task audio --prompt "a steady tone at 440 hertz, lasting 1 second"
    python generate.py ERNIE5.ckpt --task caption --input clip.mp4     # or an image / a .wav file
    python generate.py ERNIE5.ckpt --task text --prompt "Mira Okafor was born"

A language-model checkpoint carries its tokenizer; a VideoAR checkpoint records the path of its
frozen video tokenizer. `--frames` counts latent frames (1 + time_stride * (n - 1) pixel frames);
continuing past the trained length re-encodes the last frames of each window (frame re-encoding).
An FSDP2 (directory) checkpoint is first consolidated with tools/consolidate_checkpoint.py.
Checkpoints load weights only (`models.io.load_checkpoint`): a file whose pickle would run code is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_modules.lm import LanguageModelModule
from models.io import load_checkpoint, refuse_unsafe_pickle


def load_module(ckpt: str | Path, device: str = "cpu") -> LanguageModelModule:
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a distributed (FSDP2) checkpoint; consolidate it first: "
            f"python tools/consolidate_checkpoint.py {path} {path.with_suffix('.consolidated.ckpt')}"
        )
    cls, extra = LanguageModelModule, {}
    if is_ernie3(path):
        from lit_modules.ernie3 import Ernie3Module as cls  # NLG module generation
    hparams = load_checkpoint(path).get("hyper_parameters") or {}
    if "evaluate" in hparams:  # an SFT or RL policy: its architecture is stored; its init checkpoint is not needed
        if "rl" in hparams:
            from lit_modules.rl import RLModule as cls
        else:
            from lit_modules.sft import SFTModule as cls
        extra = {"init_ckpt": None}
    with refuse_unsafe_pickle(path):
        module = cls.load_from_checkpoint(path, map_location=device, weights_only=True, **extra)
    if module.tokenizer is None:
        raise ValueError(f"{path} holds no tokenizer; was it written by lit_modules.lm?")
    return module.to(device).eval()


def _checkpoint_has(ckpt: str | Path, key: str) -> bool:
    path = Path(ckpt)
    return path.is_file() and key in load_checkpoint(path)


def is_ernie3(ckpt: str | Path) -> bool:
    """An ERNIE 3.0 pre-training checkpoint (lit_modules/ernie3.py)."""
    return _checkpoint_has(ckpt, "ernie3_knobs")


def is_videoar(ckpt: str | Path) -> bool:
    return _checkpoint_has(ckpt, "video_tokenizer")


def load_videoar(ckpt: str | Path, device: str = "cpu"):
    from lit_modules.videoar import VideoARModule

    # on_load_checkpoint builds the net (and loads its frozen tokenizer) before the weights go in
    with refuse_unsafe_pickle(ckpt):
        module = VideoARModule.load_from_checkpoint(ckpt, map_location=device, weights_only=True)
    module.tokenizer.to(device)
    return module.to(device).eval()


def is_ernie5(ckpt: str | Path) -> bool:
    """An ERNIE 5.0 checkpoint (lit_modules/ernie5.py: it records its text vocabulary and both tokenizers)."""
    path = Path(ckpt)
    if not path.is_file():
        return False
    ckpt_ = load_checkpoint(path)
    return "text_tokenizer" in ckpt_ and "tokenizers" in ckpt_


ERNIE5_TASKS = ("text", "image", "video", "audio", "caption")


def generate_ernie5(args) -> list:
    """ERNIE 5.0 any-to-any: text / caption -> image, video or sound / media file -> caption."""
    from models.io import atomic_write
    from lit_modules.ernie5 import Ernie5Module

    with refuse_unsafe_pickle(args.ckpt):
        module = Ernie5Module.load_from_checkpoint(args.ckpt, map_location=args.device, weights_only=True)
    module = module.to(args.device).eval()
    module._tokenizers_to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    opts = {"temperature": args.temperature, "top_k": args.top_k or 0, "top_p": args.top_p or 0.0,
            "max_new_tokens": args.max_new_tokens}
    if args.cfg is not None:
        opts["guidance"] = args.cfg
    out_dir = Path(args.out)
    results = []
    refiner = None
    if args.refiner:
        if args.task not in ("image", "video"):
            raise ValueError(f"--refiner refines images and videos, not --task {args.task}")
        from models.refiner import load_refiner

        refiner = load_refiner(args.refiner, map_location=args.device)
    if args.task == "caption":
        if not args.input:
            raise ValueError("--task caption needs --input (an image, video or audio file)")
        for path in args.input:
            medium, item, pixels = _encode_media(module, Path(path), args.device)
            for i in range(args.num_samples):
                text = module.caption(medium, item, gen, pixels=pixels, **opts)
                print(f"--- {path} ({medium}), sample {i}\n{text}\n")
                results.append(text)
        return results
    prompts = args.prompt or []
    if not prompts:
        raise ValueError(f"--task {args.task} needs --prompt")
    atok = module.audio_tokenizer
    reference = None
    if args.reference:
        if args.task != "audio":
            raise ValueError(f"--reference gives the voice of --task audio, not --task {args.task}")
        if module.net.speaker_enc is None:
            raise ValueError(f"--reference: {args.ckpt} has no speaker embedding (train with data.speakers > 0)")
        medium, reference, _ = _encode_media(module, Path(args.reference), args.device)
        if medium != "audio":
            raise ValueError(f"--reference {args.reference} must be a sound file (.wav / .flac / .ogg)")
    for j, prompt in enumerate(prompts):
        for i in range(args.num_samples):
            name = out_dir / f"{args.task}_{j:02d}_{i:02d}"
            if args.task == "text":
                text = module.continue_text(prompt, gen, **opts)
                print(f"--- sample {i} (prompt {prompt!r})\n{prompt}{text}\n")
                results.append(text)
            elif args.task in ("image", "video"):
                from datamodules.media_io import write_video

                frames = 1 if args.task == "image" else args.frames
                _, video = module.render(prompt, args.task, frames, gen, **opts)
                if refiner is not None:  # the cascade: each frame through the diffusion refiner
                    video = refine_frames(refiner, video, args.refine_steps, gen, args.refine_eta)
                pix = ((video[0].clamp(-1, 1) + 1) * 127.5).round().byte().cpu()  # [3, T, H, W]
                if args.task == "image":
                    from torchvision.io import encode_png

                    path = name.with_suffix(".png")
                    data = encode_png(pix[:, 0]).numpy().tobytes()
                    atomic_write(path, lambda tmp, d=data: Path(tmp).write_bytes(d))
                else:
                    path = write_video(name.with_suffix(f".{args.format}"), pix.permute(1, 2, 3, 0), fps=args.fps)
                print(path)
                results.append(Path(path))
            else:
                from datamodules.media_io import write_audio

                frames = max(1, int(round(args.seconds * atok.codes_per_second)))
                _, wave = module.speak(prompt, frames, gen, reference=reference, **opts)
                path = write_audio(name.with_suffix(".wav"), wave[0].clamp(-1, 1).cpu(), int(atok.cfg.sample_rate))
                print(path)
                results.append(Path(path))
    return results


def refine_frames(refiner, video: torch.Tensor, steps: int, generator: torch.Generator,
                  eta: float = 1.0) -> torch.Tensor:
    """Video [B, 3, T, h, w] -> [B, 3, T, s*h, s*w]: every frame refined independently."""
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)
    out = refiner.sample(frames.to(next(refiner.parameters()).device), steps, eta, generator=generator)
    return out.reshape(b, t, c, *out.shape[-2:]).transpose(1, 2)


def _encode_media(module, path: Path, device: str) -> tuple[str, torch.Tensor, Optional[torch.Tensor]]:
    """A media file -> (medium, latents [T', d, H, W] or codes [F, Q] through the model's frozen
    tokenizers, the frames [T, H, W, 3] uint8 of an image / video (None for a sound))."""
    from datamodules.media import decode_image_file, decode_video_file

    vtok, atok = module.visual_tokenizer, module.audio_tokenizer
    suffix = path.suffix.lower()
    size = vtok.scales[-1][0] * vtok.cfg.spatial_factor
    if suffix in (".wav", ".flac", ".ogg"):
        rate = int(atok.cfg.sample_rate)
        from datamodules.media_io import read_audio

        wave = read_audio(path, rate).clamp(-1, 1)[None].to(device)
        return "audio", atok.encode(wave)[0], None
    if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        raw = decode_image_file(path, size)  # [1, 3, H, W] uint8
        img = raw.float().div(127.5).sub(1).to(device)
        return "image", vtok.encode_features(img).transpose(1, 2)[0], raw.permute(0, 2, 3, 1).to(device)
    clip = decode_video_file(path, 1 + vtok.cfg.time_stride * 2, None, 1, size, "pad")  # [1, T, 3, H, W]
    x = clip.float().div(127.5).sub(1).permute(0, 2, 1, 3, 4).to(device)
    return "video", vtok.encode_features(x).transpose(1, 2)[0], clip[0].permute(0, 2, 3, 1).to(device)


def generate_video(args) -> list[Path]:
    from datamodules.media_io import write_video

    module = load_videoar(args.ckpt, args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    labels = torch.tensor(args.classes or [0], device=args.device)
    overrides = {"temperature": args.temperature, "top_k": args.top_k or 0, "top_p": args.top_p or 0.0}
    if args.guidance is not None:
        overrides["guidance"] = args.guidance
    if args.continue_from:
        from datamodules.media_io import read_video

        frames, _ = read_video(args.continue_from, num_frames=args.given_frames)
        size = module.tokenizer.scales[-1][0] * module.tokenizer.cfg.spatial_factor
        from torchvision.transforms import v2

        x = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])(frames.permute(0, 3, 1, 2))
        x = (x.float() / 127.5 - 1).permute(1, 0, 2, 3)[None].to(args.device)
        tau = module.tokenizer.cfg.time_stride
        x = x[:, :, : 1 + (x.shape[2] - 1) // tau * tau]
        window = args.window or module.net_cfg.max_frames
        video = module.extend_video(x.expand(len(labels), -1, -1, -1, -1), labels, args.frames, window,
                                    args.overlap, gen, **overrides)
    else:
        _, video = module.generate_clips(labels, args.frames, gen, **overrides)
    out_dir = Path(args.out)
    paths = []
    for i in range(video.shape[0]):
        frames = ((video[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu()  # [T, H, W, 3]
        path = out_dir / f"sample_{i:03d}_class{int(labels[i])}.{args.format}"
        write_video(path, frames, fps=args.fps)
        paths.append(path)
        print(path)
    return paths


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a .ckpt file written by train.py")
    v = p.add_argument_group("video (VideoAR checkpoints)")
    v.add_argument("--classes", type=int, nargs="*", help="one clip per class id")
    v.add_argument("--frames", type=int, default=3, help="latent frames to produce")
    v.add_argument("--guidance", type=float, nargs=3, default=None, metavar=("FIRST_START", "FIRST_END", "FINAL"),
                   help="temporal-spatial CFG schedule (default: the checkpoint's)")
    v.add_argument("--continue-from", default=None, help="a video file whose frames are continued")
    v.add_argument("--given-frames", type=int, default=None, help="pixel frames read from --continue-from")
    v.add_argument("--window", type=int, default=None, help="latent frames per generation window (re-encoding)")
    v.add_argument("--overlap", type=int, default=1, help="latent frames re-encoded as the next window's context")
    v.add_argument("--out", default="samples", help="output folder")
    v.add_argument("--format", default="gif", choices=["gif", "mp4"])
    v.add_argument("--fps", type=int, default=8)
    e = p.add_argument_group("ERNIE 5.0 checkpoints")
    e.add_argument("--task", choices=ERNIE5_TASKS, default="text",
                   help="text: continue --prompt; image / video / audio: generate from the --prompt caption; "
                        "caption: describe --input files")
    e.add_argument("--input", action="append", default=None, help="--task caption: an image, video or audio file")
    e.add_argument("--cfg", type=float, default=None, help="classifier-free guidance for image / video "
                   "(default: the checkpoint's sample.guidance)")
    e.add_argument("--refiner", default=None, help="--task image / video: a refiner checkpoint "
                   "(experiment=ernie5_refiner) that upsamples every generated frame (the cascade)")
    e.add_argument("--refine-steps", type=int, default=25, help="sampling steps of the refiner")
    e.add_argument("--refine-eta", type=float, default=1.0, help="1 = ancestral sampling, 0 = deterministic DDIM")
    e.add_argument("--seconds", type=float, default=1.0, help="--task audio: length of the sound")
    e.add_argument("--reference", default=None, help="--task audio: a sound file in the voice to speak in (the "
                   "speaker token; checkpoints trained with data.speakers > 0)")
    p.add_argument("--prompt", action="append", default=None, help="repeatable; default: empty prompt")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if is_ernie5(args.ckpt):
        if args.temperature == 0.8 and "--temperature" not in args.argv:
            args.temperature = 1.0
        return generate_ernie5(args)
    if is_videoar(args.ckpt):
        if args.temperature == 0.8 and "--temperature" not in (argv or []):
            args.temperature = 1.0
        return generate_video(args)

    module = load_module(args.ckpt, args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    samples = []
    for prompt in args.prompt or [""]:
        for i in range(args.num_samples):
            opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
            if args.top_p is not None:
                opts["top_p"] = args.top_p
            text = module.generate_text([prompt], generator=gen, **opts)[0]
            samples.append(text)
            print(f"--- sample {i} (prompt {prompt!r})\n{text}\n")
    return samples


if __name__ == "__main__":
    main()
