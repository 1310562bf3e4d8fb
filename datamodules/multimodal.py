"""ERNIE 5.0's data: an embedded paired multimodal corpus, tokenized once, packed into unified rows.

The corpus (no network; `source: synthetic`):
    video   moving-shapes clips (`synthetic_shapes`) with captions from their own parameters
            (`captions.video_caption`, every template), encoded by the frozen visual tokenizer
    image   single frames of other draws, with `captions.image_caption`
    audio   synthetic sounds (`synthetic_audio`) with `captions.audio_description`, encoded by the
            frozen audio tokenizer (RVQ codes)
    text    the synthetic biographies (`synthetic_bios`)
The held-out split draws every medium from other seeds (`eval_seed`) and holds out biographies.
Media are encoded once per (data config, tokenizer digests) and cached atomically under
`cache_dir` as one file, with the text tokenizer trained on the train split's text (captions
and biographies); the log says whether the cache was built or reused. `text_tokenizer` picks it:
`bpe` (byte-level BPE, the default) or `char_bpe` (ERNIE 5.0's: character BPE whose out-of-alphabet
characters fall back to UTF-16BE byte tokens; `alphabet_size` caps its alphabet).

Rows: row i of a split is a pure function of (seed, split, i): documents of the seven tasks
(`models.ernie5.TASKS`) are drawn by `task_weights` and packed into `seq_len` tokens (a draw that
does not fit is skipped, a text document is cut to fit; the rest is padding), so the train order
(a `ResumableSampler` over rows) resumes exactly. Generation documents drop their caption with
probability `caption_dropout` (the unconditional branch of classifier-free guidance). With
`bpe_dropout` p > 0, training rows segment captions and biographies with BPE-dropout (each merge
skipped with probability p, drawn from the row's seed, so resume stays exact); validation rows never
do. Batches are `models.ernie5.UnifiedBatch`.

Progressive tokenizer switching (papers.md 4.2): `visual_tokenizer_stages` lists earlier visual
tokenizers of fewer bits (same scales and latent grid) that the backbone trains on before the final
one. Every image and video is then encoded by each of them too (`video_stages` / `image_stages` in a
split, one tensor per stage), and a training row's visual latents are the final tokenizer's channels
followed by each stage's, concatenated along the channel axis ([T', d + d_1 + d_2 .., H, W]); the
LightningModule reads the slice of its current stage (`Ernie5Module.visual_stage`), so the switch is a
knob of the module and the rows stay a pure function of (seed, split, index).

Speakers (papers.md 4.3, TTS): with `speakers` N > 0 the synthetic sounds are rendered in a bank of N
voices (`synthetic_audio.voice_params`); a manifest's audio lines may name theirs (`"speaker": "..."`).
Each sound's speaker id is kept (`audio_speakers`, -1 = unknown), and an audio generation document of
a sound with a known speaker starts with a speaker token whose embedding the network computes from a
*reference*: another clip of the same speaker in the same split, drawn from the row's generator
(`SPK T .. BOA A .. EOA`). Training rows leave the token out with probability `speaker_dropout`, so
generation without a reference stays in distribution. Descriptions never name the voice: only the
reference carries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules import captions as cap
from datamodules.resumable import ResumableDataModule
from models.ernie5 import (BOUNDARY_TOKENS, IGNORE, KINDS, SPAN_TOKENS, TASKS, AudioSpans, DocumentBuilder,
                           UnifiedBatch, VisualSpans)
from models.io import atomic_torch_save, load_checkpoint
from models.random import multinomial
from models.tokenizers.checkpoint import load_media_tokenizer

__all__ = ["CaptionPrompts", "MultimodalCorpus", "MultimodalDataModule", "Vocabulary", "caption_document", "item_pixels",
           "collate_rows", "pack_documents"]

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the corpus keeps the images' and videos' pixels (the patch merger's ViT branch)
TASK_MODALITY = {"text": 0, "image_und": 1, "image_gen": 1, "video_und": 2, "video_gen": 2, "audio_und": 3,
                 "audio_gen": 3}


class Vocabulary:
    """The unified text id space: BPE ids [0, V_bpe), then the boundary tokens (`BOUNDARY_TOKENS`)."""

    def __init__(self, bpe) -> None:
        self.bpe = bpe
        self.base = bpe.vocab_size
        self.special = {name: self.base + i for i, name in enumerate(BOUNDARY_TOKENS)}

    def __len__(self) -> int:
        return self.base + len(BOUNDARY_TOKENS)

    @property
    def eos(self) -> int:
        return self.bpe.eos_id

    def __getitem__(self, name: str) -> int:
        return self.special[name]

    def encode(self, text: str, dropout: float = 0.0, rng: Optional[random.Random] = None) -> list[int]:
        """BPE ids of `text` (`dropout` > 0: a BPE-dropout segmentation drawn from `rng`)."""
        return self.bpe.encode(text, dropout, rng)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; boundary tokens are written as their names, EOS ends the text."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i >= self.base:
                out.append(self.bpe.decode(run))
                run = []
                out.append(BOUNDARY_TOKENS[i - self.base] if i - self.base < len(BOUNDARY_TOKENS) else "<?>")
            else:
                run.append(i)
        out.append(self.bpe.decode(run))
        return "".join(out)


# ---------------------------------------------------------------------------------------- corpus


def _render_split(cfg: dict, seed: int, n_video: int, n_image: int, n_audio: int) -> dict:
    """Pixels / waves and captions of one split (nothing encoded yet)."""
    from datamodules.synthetic_audio import render_synthetic_audio
    from datamodules.synthetic_shapes import clip_params, render_moving_shapes

    size, frames = cfg["image_size"], cfg["num_frames"]
    out = {}
    vids, _ = render_moving_shapes(n_video, frames, size, seed)
    vp = clip_params(n_video, frames, size, seed)
    out["video"] = vids
    out["video_captions"] = [[cap.video_caption(p, t) for t in range(cap.CAPTION_TEMPLATES)] for p in vp]
    imgs, _ = render_moving_shapes(n_image, 1, size, seed + 7919)
    ip = clip_params(n_image, 1, size, seed + 7919)
    out["image"] = imgs
    out["image_captions"] = [[cap.image_caption(p, 0, t) for t in range(cap.IMAGE_TEMPLATES)] for p in ip]
    voices = int(cfg.get("speakers") or 0)
    waves, _, _, ap = render_synthetic_audio(n_audio, cfg["clip_seconds"], cfg["sample_rate"], seed, return_params=True,
                                             voices=voices)
    out["audio"] = waves
    out["audio_speakers"] = torch.tensor([p.get("voice", -1) for p in ap], dtype=torch.long)
    out["audio_captions"] = [[cap.audio_description(p, t) for t in range(cap.AUDIO_TEMPLATES)] for p in ap]
    return out


MEDIA_KEYS = ("image", "video", "audio")


def _decode_items(medium: str, path: Path, cfg: dict) -> list[torch.Tensor]:
    """One media file -> its items: an image uint8 [1, H, W, 3]; a video's clips uint8 [T, H, W, 3]
    (windows of num_frames every clip_stride frames, at most clips_per_video; a short video is padded
    with its last frame); a sound's first clip float32 [samples]."""
    from datamodules.media import clip_layout, decode_audio_file, decode_image_file, decode_video_frames, fit_clip_length

    size = cfg["image_size"]
    if medium == "image":
        return [decode_image_file(path, size)[0].permute(1, 2, 0)[None]]
    if medium == "video":
        T, stride, per = cfg["num_frames"], cfg["clip_stride"] or cfg["num_frames"], cfg["clips_per_video"]
        need = None if per == 0 else T + (per - 1) * stride
        frames = decode_video_frames(path, need, None, 1, size)  # [t, 3, H, W]
        n, _ = clip_layout(frames.shape[0], T, stride, per, "pad")
        clips = [fit_clip_length(frames[i * stride:i * stride + T], T, "pad") for i in range(n)]
        return [c.permute(0, 2, 3, 1) for c in clips]
    clip_len = int(round(cfg["clip_seconds"] * cfg["sample_rate"]))
    return [decode_audio_file(path, cfg["sample_rate"], clip_len, "pad")[0]]


def read_manifest(manifest: str, cfg: dict, on_bad_file: str = "error") -> tuple[dict, dict]:
    """A JSONL manifest of {"image" | "video" | "audio": path, "text": caption} lines (an audio line may add
    "speaker": a name; speaker ids number the sorted names) -> (raw splits in
    `_render_split`'s layout, {'bad_files': n, 'skipped': [where: reason]}). Relative paths are relative
    to the manifest; a long video gives up to clips_per_video clips (every clip_stride frames), each with
    the line's caption. A line without exactly one medium or without a caption, or a file that is missing,
    unreadable or undecodable, is an error naming the file and its manifest line (or, under
    on_bad_file=skip, is left out and counted). Items are split by a seeded permutation of the files (val_fraction): a video's clips stay in one split."""
    from datamodules.jsonl import iter_jsonl, where
    from datamodules.media_io import MediaDecodeError

    root = Path(manifest).parent
    items: dict[str, list] = {m: [] for m in MEDIA_KEYS}
    skipped = []
    for lineno, row in iter_jsonl(manifest):
        media = [m for m in MEDIA_KEYS if m in row]
        text = row.get("text")
        if len(media) != 1 or not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where(manifest, lineno)}: a manifest line needs exactly one of "
                             f"{list(MEDIA_KEYS)} and a non-empty \"text\", got keys {sorted(row)}")
        medium = media[0]
        path = Path(os.path.expanduser(str(row[medium])))
        path = path if path.is_absolute() else root / path
        try:
            if not path.is_file():
                raise MediaDecodeError(f"{path}: no such file")
            xs = _decode_items(medium, path, cfg)
            if not xs:
                raise MediaDecodeError(f"{path}: no frames")
        except (MediaDecodeError, OSError, RuntimeError, ValueError) as e:
            msg = f"{where(manifest, lineno)}: {medium} file {path}: {str(e).splitlines()[-1] if str(e) else type(e).__name__}"
            if on_bad_file == "skip":
                skipped.append(msg)
                log.warning("skipping %s", msg)
                continue
            raise ValueError(msg) from e
        speaker = row.get("speaker") if medium == "audio" else None
        if speaker is not None and (not isinstance(speaker, str) or not speaker.strip()):
            raise ValueError(f"{where(manifest, lineno)}: \"speaker\" must be a non-empty string, got {speaker!r}")
        # one group per file: its clips share a split
        items[medium].append([(x, text.strip(), speaker.strip() if speaker else None) for x in xs])
    if not any(items.values()):
        raise ValueError(f"manifest {manifest} has no usable items ({len(skipped)} skipped)")
    names = sorted({spk for files in items.values() for group in files for _, _, spk in group if spk})
    speaker_id = {name: i for i, name in enumerate(names)}
    splits = {"train": {}, "val": {}}
    for medium, files in items.items():
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(cfg["data_seed"])).tolist()
        n_val = int(len(files) * cfg["val_fraction"]) if len(files) > 1 else 0
        for split, chosen in (("val", order[:n_val]), ("train", order[n_val:])):
            pairs = [p for i in chosen for p in files[i]]
            xs = [x for x, _, _ in pairs]
            empty = torch.zeros(0, int(round(cfg["clip_seconds"] * cfg["sample_rate"]))) if medium == "audio" else \
                torch.zeros(0, 1 if medium == "image" else cfg["num_frames"], cfg["image_size"], cfg["image_size"], 3,
                            dtype=torch.uint8)
            splits[split][medium] = torch.stack(xs) if xs else empty
            splits[split][f"{medium}_captions"] = [[text] for _, text, _ in pairs]
            if medium == "audio":
                splits[split]["audio_speakers"] = torch.tensor([speaker_id.get(spk, -1) for _, _, spk in pairs],
                                                               dtype=torch.long)
    return splits, {"bad_files": len(skipped), "skipped": skipped}


def _source_digest(manifest: str) -> str:
    """What a manifest's items are: its bytes and every file's size and modification time."""
    from datamodules.jsonl import iter_jsonl

    h = hashlib.sha256(Path(manifest).read_bytes())
    root = Path(manifest).parent
    for _, row in iter_jsonl(manifest):
        for m in MEDIA_KEYS:
            if m in row:
                p = Path(os.path.expanduser(str(row[m])))
                p = p if p.is_absolute() else root / p
                st = p.stat() if p.is_file() else None
                h.update(f"{p}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:20]


def check_stage_tokenizer(tok, final, key: str, path: str, prev_bits: Optional[int] = None) -> None:
    """A progressive-switching stage tokenizer must tokenize like the final one, with fewer bits: a 3D
    bitwise tokenizer with the same scales and latent grid (spatial and temporal factors)."""
    if not tok.cfg.video or tok.cfg.quantizer != "bits":
        raise ValueError(f"{key}={path} must be a 3D bitwise video tokenizer (model.net.video=true, quantizer=bits)")
    if [list(s) for s in tok.scales] != [list(s) for s in final.scales]:
        raise ValueError(f"{key}={path} has scales {[list(s) for s in tok.scales]}; the final visual tokenizer's are "
                         f"{[list(s) for s in final.scales]} (a stage switches bits, not scales)")
    if (tok.cfg.spatial_factor, tok.cfg.time_stride) != (final.cfg.spatial_factor, final.cfg.time_stride):
        raise ValueError(f"{key}={path} has spatial / temporal factors {(tok.cfg.spatial_factor, tok.cfg.time_stride)}, "
                         f"the final visual tokenizer {(final.cfg.spatial_factor, final.cfg.time_stride)}")
    if tok.cfg.dim > final.cfg.dim or (prev_bits is not None and tok.cfg.dim < prev_bits):
        raise ValueError(f"{key}={path} has {tok.cfg.dim} bits: stages go from fewer to more bits, up to the final "
                         f"tokenizer's {final.cfg.dim}" + (f" (the stage before has {prev_bits})" if prev_bits else ""))


@torch.no_grad()
def _encode_visual(tok, clips: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> latents float32 [N, T', d, H', W']."""
    out = []
    for s in range(0, clips.shape[0], batch):
        x = clips[s:s + batch].float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)  # [n, 3, T, H, W]
        if x.shape[2] == 1:
            x = x[:, :, 0]
        out.append(tok.encode_features(x).transpose(1, 2).contiguous())
    return torch.cat(out) if out else torch.zeros(0, 1, tok.cfg.dim, 1, 1)


@torch.no_grad()
def _encode_audio(tok, waves: torch.Tensor, batch: int = 64) -> torch.Tensor:
    if not waves.shape[0]:
        return torch.zeros(0, 1, tok.cfg.num_quantizers, dtype=torch.long)
    return torch.cat([tok.encode(waves[s:s + batch]) for s in range(0, waves.shape[0], batch)])


class MultimodalCorpus:
    """Both splits' encoded media, captions and text, plus the vocabulary (see the module docstring).

    splits[name] = {'video': latents [N, T', d, H, W], 'video_pixels': uint8 [N, T, H_px, W_px, 3],
    'video_captions': [[str per template]], 'image': [N, 1, d, H, W], 'image_pixels': [N, 1, H_px, W_px, 3],
    'audio': codes [N, F, Q], ..._captions, 'text': [token id lists]}.
    """

    def __init__(self, splits: dict, vocab: Vocabulary, info: dict) -> None:
        self.splits, self.vocab, self.info = splits, vocab, info

    @classmethod
    def build_or_load(cls, cfg: dict, visual_ckpt: str, audio_ckpt: str, cache_dir: Path,
                      stage_ckpts: Sequence[str] = ()) -> "MultimodalCorpus":
        """stage_ckpts: the progressive switching's earlier visual tokenizers (`data.visual_tokenizer_stages`)."""
        from models.tokenizers.text import BPETokenizer

        vtok, vinfo = load_media_tokenizer(visual_ckpt, "visual")
        atok, ainfo = load_media_tokenizer(audio_ckpt, "audio")
        if not vtok.cfg.video:
            raise ValueError(f"data.visual_tokenizer {visual_ckpt} is a 2D image tokenizer; ERNIE 5.0 needs the "
                             "3D video tokenizer (images are 1-frame videos)")
        stage_toks, stage_infos = [], []
        for i, path in enumerate(stage_ckpts):
            tok, info = load_media_tokenizer(path, "visual")
            check_stage_tokenizer(tok, vtok, f"data.visual_tokenizer_stages.{i}", path,
                                  prev_bits=stage_toks[-1].cfg.dim if stage_toks else None)
            stage_toks.append(tok)
            stage_infos.append(info)
        content = {k: cfg[k] for k in sorted(cfg) if k not in ("batch_size", "seed", "num_workers", "seq_len",
                                                              "task_weights", "caption_dropout", "train_rows",
                                                              "val_rows", "cache_dir", "text_len", "source",
                                                              "text_source", "on_bad_file", "clips_per_video",
                                                              "clip_stride", "text_tokenizer", "alphabet_size",
                                                              "speakers", "speaker_dropout")}
        if cfg.get("text_tokenizer", "bpe") != "bpe":  # the default keeps the caches written before the option
            content.update(text_tokenizer=cfg["text_tokenizer"], alphabet_size=cfg.get("alphabet_size"))
        if cfg.get("speakers") and cfg["source"] == "synthetic":  # 0 keeps the caches written before the option
            content.update(speakers=int(cfg["speakers"]))
        if cfg["source"] != "synthetic":
            content.update(manifest_speakers=True)
            content.update(source=cfg["source"], on_bad_file=cfg["on_bad_file"], clips_per_video=cfg["clips_per_video"],
                           clip_stride=cfg["clip_stride"],
                           source_digest=_source_digest(cfg["source"]))
        if cfg.get("text_source"):
            from datamodules.text import corpus_hash, load_documents

            content["text_digest"] = corpus_hash(load_documents(cfg["text_source"]))
        keyed = [CACHE_VERSION, content, vinfo["digest"], ainfo["digest"]]
        if stage_infos:  # without stages the key is the one written before the option
            keyed.append([i["digest"] for i in stage_infos])
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"multimodal-{key}.pt"
        info = {"path": str(path), "visual_digest": vinfo["digest"], "audio_digest": ainfo["digest"],
                "scales": [list(s) for s in vtok.scales], "bits": vtok.cfg.dim,
                "audio_levels": atok.cfg.num_quantizers, "audio_codebook": atok.cfg.codebook_size,
                "visual_stages": [{"digest": i["digest"], "bits": t.cfg.dim} for t, i in zip(stage_toks, stage_infos)]}
        if path.is_file():
            try:
                blob = load_checkpoint(path, what="multimodal token cache")
                log.info("multimodal corpus: reusing the token cache %s", path)
                return cls(blob["splits"], Vocabulary(BPETokenizer.from_str(blob["bpe"])),
                           {**info, "bad_files": blob["info"].get("bad_files", 0), "built": False})
            except Exception as e:  # an unreadable cache is rebuilt, never trusted
                log.warning("multimodal corpus: ignoring unreadable cache %s (%s); rebuilding", path, e)
        t0 = time.time()
        log.info("multimodal corpus: building the token cache %s (rendering, encoding with the frozen tokenizers)", path)
        from datamodules.synthetic_bios import generate_biographies
        from models.tokenizers.text import build_tokenizer

        if cfg.get("text_source"):
            from datamodules.text import load_documents

            bios = load_documents(cfg["text_source"])
        else:
            bios = generate_biographies(cfg["num_people"], seed=cfg["text_seed"]).documents
        n_val_bios = max(1, int(len(bios) * cfg["val_fraction"]))
        texts = {"train": bios[n_val_bios:], "val": bios[:n_val_bios]}
        bad = {"bad_files": 0, "skipped": []}
        if cfg["source"] == "synthetic":
            raw = {"train": _render_split(cfg, cfg["data_seed"], cfg["num_videos"], cfg["num_images"], cfg["num_audio"]),
                   "val": _render_split(cfg, cfg["eval_seed"], cfg["val_videos"], cfg["val_images"], cfg["val_audio"])}
        else:
            raw, bad = read_manifest(cfg["source"], cfg, cfg["on_bad_file"])
        info["bad_files"] = bad["bad_files"]
        train_text = texts["train"] + [c for key_ in ("video_captions", "image_captions", "audio_captions")
                                       for caps in raw["train"][key_] for c in caps]
        bpe = build_tokenizer(cfg.get("text_tokenizer", "bpe"), texts=train_text, vocab_size=cfg["vocab_size"],
                              alphabet_size=cfg.get("alphabet_size"))
        splits = {}
        for name, r in raw.items():
            splits[name] = {
                "video": _encode_visual(vtok, r["video"]), "image": _encode_visual(vtok, r["image"]),
                "video_pixels": r["video"].contiguous(), "image_pixels": r["image"].contiguous(),
                "audio": _encode_audio(atok, r["audio"]), "audio_speakers": r["audio_speakers"],
                "video_captions": r["video_captions"], "image_captions": r["image_captions"],
                "audio_captions": r["audio_captions"],
                "text": [ids + [bpe.eos_id] for ids in bpe.encode_batch(texts[name])],
            }
            if stage_toks:
                splits[name]["video_stages"] = [_encode_visual(t, r["video"]) for t in stage_toks]
                splits[name]["image_stages"] = [_encode_visual(t, r["image"]) for t in stage_toks]
        atomic_torch_save({"version": CACHE_VERSION, "splits": splits, "bpe": bpe.hf_tokenizer.to_str(),
                           "info": info}, path)
        log.info("multimodal corpus: built %s in %.0f s", path, time.time() - t0)
        return cls(splits, Vocabulary(bpe), {**info, "built": True})

    def num_items(self, split: str) -> dict:
        s = self.splits[split]
        return {"video": len(s["video"]), "image": len(s["image"]), "audio": len(s["audio"]), "text": len(s["text"])}


# ------------------------------------------------------------------------------------------- rows


def _row_seed(seed: int, split: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()[:8], "little") & ((1 << 62) - 1)


class RowDataset(Dataset):
    """Packed rows of one split; row i is a pure function of (seed, split, i)."""

    def __init__(self, corpus: MultimodalCorpus, split: str, num_rows: int, seq_len: int, weights: dict,
                 caption_dropout: float, text_len: int, seed: int, bpe_dropout: float = 0.0,
                 speaker_dropout: float = 0.0) -> None:
        self.c, self.split, self.num_rows, self.S = corpus, split, num_rows, seq_len
        self.data = corpus.splits[split]
        self.vocab = corpus.vocab
        self.scales = [tuple(s) for s in corpus.info["scales"]]
        # a split without items of a medium (a small manifest's held-out part) draws none of its tasks
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0 and len(self.data[t.split("_")[0]]) > 0]
        if not self.tasks:
            raise ValueError(f"the {split} split has no items for any task of data.task_weights {weights} "
                             "(a manifest too small for data.val_fraction?)")
        self.probs = torch.tensor([float(weights[t]) for t in self.tasks], dtype=torch.float64)
        self.caption_dropout, self.text_len, self.seed = caption_dropout, text_len, seed
        self.bpe_dropout = bpe_dropout
        self.speaker_dropout = speaker_dropout
        speakers = self.data.get("audio_speakers")  # caches written before speakers have none
        self.speakers = None
        if speakers is not None and bool((speakers >= 0).any()):
            self.speakers = speakers.tolist()
            self.by_speaker: dict[int, list[int]] = {}
            for j, spk in enumerate(self.speakers):
                self.by_speaker.setdefault(spk, []).append(j)
        self.num_stages = len(corpus.info.get("visual_stages") or [])

    def visual(self, medium: str, j: int) -> torch.Tensor:
        """Item j's latents: the final tokenizer's channels, then each progressive stage's (module docstring)."""
        item = self.data[medium][j]
        if not self.num_stages:
            return item
        return torch.cat([item, *(st[j] for st in self.data[f"{medium}_stages"])], dim=1)

    def __len__(self) -> int:
        return self.num_rows

    def _pick(self, n: int, g: torch.Generator) -> int:
        return int(torch.randint(n, (1,), generator=g))

    def _rng(self, g: torch.Generator) -> Optional[random.Random]:
        """BPE-dropout's draws for one document (None without dropout: g is then not advanced)."""
        if self.bpe_dropout <= 0:
            return None
        return random.Random(int(torch.randint(1 << 62, (1,), generator=g)))

    def reference(self, j: int, g: torch.Generator) -> Optional[int]:
        """A reference clip for sound j's speaker token: another clip of its speaker (j itself if it is the
        only one), or None (unknown speaker, or the token dropped: `speaker_dropout`). Draws from g only
        when the data has speakers, so rows without them are those written before the option."""
        if self.speakers is None or self.speakers[j] < 0:
            return None
        if float(torch.rand((), generator=g)) < self.speaker_dropout:
            return None
        others = [i for i in self.by_speaker[self.speakers[j]] if i != j] or [j]
        return others[self._pick(len(others), g)]

    def _caption(self, key: str, j: int, g: torch.Generator) -> list[int]:
        caps = self.data[key][j]
        text = caps[self._pick(len(caps), g)]
        return self.vocab.encode(text, self.bpe_dropout, self._rng(g))

    def document(self, task: str, g: torch.Generator) -> tuple[dict, list]:
        """One document of `task`: the builder's arrays and its media [(kind, task, tensor)]."""
        v = self.vocab
        b = DocumentBuilder(0, TASKS.index(task), self.scales)
        media = []
        if task == "text":
            ids = self.data["text"][self._pick(len(self.data["text"]), g)]
            if self.bpe_dropout > 0:  # the cached ids are re-segmented whole (a window could cut a character)
                ids = v.encode(v.bpe.decode(ids[:-1]), self.bpe_dropout, self._rng(g)) + [v.eos]
            if len(ids) > self.text_len:
                s = self._pick(len(ids) - self.text_len + 1, g)
                ids = ids[s:s + self.text_len]
            b.text(ids)
        else:
            medium, role = task.split("_")
            j = self._pick(len(self.data[medium]), g)
            item = self.data[medium][j] if medium == "audio" else self.visual(medium, j)
            caption = self._caption(f"{medium}_captions", j, g)
            if role == "und":
                return caption_document(v, self.scales, medium, item, caption + [v.eos], item_pixels(self.data, medium, j))
            open_, close = SPAN_TOKENS[medium]
            if medium == "audio":
                ref = self.reference(j, g)
                if ref is not None:
                    b.speaker()
                    media.append(("speaker", task, self.data["audio"][ref]))
            if float(torch.rand((), generator=g)) < self.caption_dropout:
                caption = []
            b.text(caption + [v[open_]])
            if medium == "audio":
                b.audio(item.shape[0])
                media.append(("audio", task, item))
            else:
                b.generation(item.shape[0])
                media.append(("vis_gen", task, item))
            b.text([v[close], v.eos])
        return b.finish(), media

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(_row_seed(self.seed, self.split, index))
        S, used, tries = self.S, 0, 0
        docs = []
        while used < S and tries < 8:
            task = self.tasks[int(multinomial(self.probs, 1, g))]
            doc, media = self.document(task, g)
            n = len(doc["ids"])
            if n > S - used:
                if task == "text" and S - used >= 8:
                    doc = {k: (v[:S - used] if torch.is_tensor(v) else v) for k, v in doc.items()}
                    doc["text_targets"][-1] = IGNORE
                    doc["mtp_targets"][-2:] = IGNORE
                    n = S - used
                else:
                    tries += 1
                    continue
            docs.append((doc, media, used))
            used += n
        return self._pack(docs)

    def _pack(self, docs: list) -> dict:
        return pack_documents(docs, self.S)


def item_pixels(split: dict, medium: str, index: int) -> Optional[torch.Tensor]:
    """The frames [T, H_px, W_px, 3] uint8 of an image / video of a corpus split (None for a sound)."""
    return None if medium == "audio" else split[f"{medium}_pixels"][index]


def caption_document(vocab: "Vocabulary", scales, medium: str, item: torch.Tensor, response: Sequence[int],
                     pixels: Optional[torch.Tensor] = None) -> tuple[dict, list]:
    """An understanding document `<boX> item <eoX> <sep> response` of an image / video (latents
    [T', D, H, W], with its pixels [T, H_px, W_px, 3] for the ViT branch) or a sound (codes [F, Q]);
    `response` is the caption's ids (ending with EOS when it ended). Returns (the builder's arrays, its
    media) as `RowDataset.document` does; an understanding medium is the pair (latents, pixels)."""
    open_, close = SPAN_TOKENS[medium]
    task = f"{medium}_und"
    b = DocumentBuilder(0, TASKS.index(task), scales).text([vocab[open_]])
    if medium == "audio":
        b.audio(item.shape[0])
        media = [("audio", task, item)]
    else:
        b.understanding(item.shape[0])
        media = [("vis_und", task, (item, pixels))]
    b.text([vocab[close], vocab["<sep>"]] + list(response))
    return b.finish(), media


def pack_documents(docs: list, S: int) -> dict:
    """One packed row of `S` tokens from [(document arrays, media, first token)] (see `RowDataset`)."""
    row = {"ids": torch.zeros(S, dtype=torch.long), "kind": torch.full((S,), KINDS["pad"], dtype=torch.long),
           "modality": torch.full((S,), -1, dtype=torch.long), "task": torch.full((S,), -1, dtype=torch.long),
           "positions": torch.zeros(S, 3), "block_ids": torch.zeros(S, dtype=torch.long),
           "doc_ids": torch.full((S,), -1, dtype=torch.long),
           "text_targets": torch.full((S,), IGNORE, dtype=torch.long),
           "mtp_targets": torch.full((S,), IGNORE, dtype=torch.long)}
    spans, block = [], 0
    for d, (doc, media, start) in enumerate(docs):
        n = len(doc["ids"])
        sl = slice(start, start + n)
        for k in ("ids", "kind", "positions", "text_targets", "mtp_targets", "task"):
            row[k][sl] = doc[k]
        kind = doc["kind"]
        mod = torch.zeros_like(kind)  # text / boundary tokens: text
        medium = TASK_MODALITY[TASKS[int(doc["task"][0])]]
        mod[kind != KINDS["text"]] = medium
        row["modality"][sl] = mod
        row["block_ids"][sl] = doc["block_ids"] + block
        block += int(doc["block_ids"].max()) + 1 if n else 0
        row["doc_ids"][sl] = d
        for (kind_name, first, count), (mkind, task, tensor) in zip(doc["spans"], media):
            assert kind_name == mkind
            spans.append((mkind, task, start + first, count, tensor))
    pad = S - (docs[-1][2] + len(docs[-1][0]["ids"]) if docs else 0)
    if pad:
        row["block_ids"][S - pad:] = block + torch.arange(pad)
        row["doc_ids"][S - pad:] = len(docs)
    row["spans"] = spans
    return row


class CaptionPrompts(Dataset):
    """Captioning prompts of one split for RL (`data.mode=captions`): {'medium', 'index'} items.

    balanced (train): the media take turns (item i is medium i mod M), each cycling through its own
        items, over M x (the largest medium's count) items, so every medium is prompted equally often
        however many items it has (the corpus holds 8x more sounds than images); the train sampler
        shuffles them, resumably. Otherwise (validation): each medium's first `per_medium` items in order.
    """

    def __init__(self, corpus: MultimodalCorpus, split: str, media: Sequence[str], per_medium: Optional[int] = None,
                 balanced: bool = False) -> None:
        data = corpus.splits[split]
        counts = {m: len(data[m]) if per_medium is None else min(per_medium, len(data[m])) for m in media}
        self.media = [m for m in media if counts[m] > 0]
        if not self.media:
            raise ValueError(f"the {split} split has no items of data.caption_media {list(media)}")
        self.counts, self.balanced = counts, balanced
        self.items = None if balanced else [{"medium": m, "index": j} for m in self.media for j in range(counts[m])]

    def __len__(self) -> int:
        if self.balanced:
            return len(self.media) * max(self.counts[m] for m in self.media)
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        if self.balanced:
            m = self.media[i % len(self.media)]
            return {"medium": m, "index": (i // len(self.media)) % self.counts[m]}
        return dict(self.items[i])


def collate_prompts(items: Sequence[dict]) -> list[dict]:
    return list(items)


def collate_rows(rows: Sequence[dict]) -> UnifiedBatch:
    """Stack rows; group media spans by (kind, task) with flat destination indices row * S + position."""
    S = rows[0]["ids"].shape[0]
    fields = {k: torch.stack([r[k] for r in rows]) for k in ("ids", "kind", "modality", "task", "positions",
                                                               "block_ids", "doc_ids", "text_targets", "mtp_targets")}
    groups: dict = {}
    for b, r in enumerate(rows):
        for mkind, task, start, count, tensor in r["spans"]:
            g = groups.setdefault((mkind, task), ([], []))
            g[0].append(tensor)
            g[1].append(b * S + start + torch.arange(count))
    batch = UnifiedBatch(**fields)
    for (mkind, task), (tensors, dest) in sorted(groups.items(), key=lambda kv: (kv[0][0], TASKS.index(kv[0][1]))):
        dest = torch.stack(dest)
        if mkind == "vis_und":  # (latents, pixels or None) pairs
            pix = [t[1] for t in tensors]
            pixels = torch.stack(pix) if all(p is not None for p in pix) else None
            batch.vis_und.append(VisualSpans(task, torch.stack([t[0] for t in tensors]), dest, pixels))
            continue
        data = torch.stack(tensors)
        if mkind == "audio":
            batch.audio.append(AudioSpans(task, data, dest))
        elif mkind == "speaker":
            batch.speakers.append(AudioSpans(task, data, dest))
        else:
            batch.vis_gen.append(VisualSpans(task, data, dest))
    return batch


# ------------------------------------------------------------------------------------ DataModule


class MultimodalDataModule(ResumableDataModule):
    """Packed unified rows over the embedded multimodal corpus (see the module docstring).

    visual_tokenizer / audio_tokenizer: frozen tokenizer checkpoints (an experiment's `requires`
        builds them); the visual one must be the 3D video tokenizer.
    visual_tokenizer_stages: progressive tokenizer switching's earlier visual tokenizers, fewest bits
        first (same scales and latent grid as the final one); training rows carry every stage's latents
        (module docstring) and `callbacks/progressive_tokenizer` moves the module from one to the next.
    task_weights: {task: weight} over `models.ernie5.TASKS` (0 leaves a task out).
    seq_len: tokens per packed row; train_rows / val_rows: rows per epoch / in validation.
    mode: 'rows' (packed unified rows) or 'captions' (RL: batches of `batch_size` captioning prompts
        {'medium', 'index'} over `caption_media` of the train split, every medium equally often;
        validation: the first `val_prompts` held-out items of each medium).
    """

    def __init__(self, visual_tokenizer: Optional[str] = None, audio_tokenizer: Optional[str] = None,
                 cache_dir: str = "data/cache/multimodal", source: str = "synthetic", seq_len: int = 512,
                 batch_size: int = 8, train_rows: int = 2048, val_rows: int = 64,
                 task_weights: Optional[dict] = None, caption_dropout: float = 0.1, text_len: int = 128,
                 image_size: int = 32, num_frames: int = 9, clip_seconds: float = 1.0, sample_rate: int = 16000,
                 num_videos: int = 512, num_images: int = 512, num_audio: int = 4096, val_videos: int = 64,
                 val_images: int = 64, val_audio: int = 64, num_people: int = 1000, val_fraction: float = 0.1,
                 vocab_size: int = 2048, data_seed: int = 100, eval_seed: int = 200, text_seed: int = 0,
                 seed: int = 0, num_workers: int = 0, text_source: Optional[str] = None,
                 on_bad_file: str = "error", clips_per_video: int = 1, clip_stride: Optional[int] = None,
                 mode: str = "rows", caption_media: Optional[list] = None, val_prompts: int = 32,
                 text_tokenizer: str = "bpe", alphabet_size: Optional[int] = None, bpe_dropout: float = 0.0,
                 visual_tokenizer_stages: Optional[list] = None, speakers: int = 0,
                 speaker_dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()  # checkpoints record the data config (tools rebuild the held-out split)
        if mode not in ("rows", "captions"):
            raise ValueError(f"data.mode must be 'rows' or 'captions', got {mode!r}")
        caption_media = ["image", "video", "audio"] if caption_media is None else list(caption_media)
        bad_media = sorted(set(caption_media) - {"image", "video", "audio"})
        if bad_media or not caption_media:
            raise ValueError(f"data.caption_media must list image / video / audio, got {list(caption_media)}")
        if val_prompts < 1:
            raise ValueError(f"data.val_prompts must be >= 1, got {val_prompts}")
        self.mode, self.caption_media, self.val_prompts = mode, list(caption_media), int(val_prompts)
        if source != "synthetic" and not (str(source).endswith(".jsonl") and Path(source).is_file()):
            raise ValueError(f"data.source must be 'synthetic' or an existing .jsonl manifest, got {source!r}")
        if clips_per_video < 0 or (clip_stride is not None and clip_stride < 1):
            raise ValueError(f"data.clips_per_video must be >= 0 (0 = all) and data.clip_stride >= 1 or null, "
                             f"got {clips_per_video}, {clip_stride}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"data.on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        weights = dict(task_weights or {t: 1.0 for t in TASKS})
        bad = sorted(set(weights) - set(TASKS))
        if bad:
            raise ValueError(f"data.task_weights has unknown tasks {bad}; known: {list(TASKS)}")
        if any(float(w) < 0 for w in weights.values()) or not any(float(w) > 0 for w in weights.values()):
            raise ValueError(f"data.task_weights must be >= 0 with at least one > 0, got {weights}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {caption_dropout}")
        if not 0.0 <= bpe_dropout < 1.0:
            raise ValueError(f"data.bpe_dropout must be in [0, 1), got {bpe_dropout}")
        if text_tokenizer not in ("bpe", "char_bpe"):
            raise ValueError(f"data.text_tokenizer must be 'bpe' or 'char_bpe', got {text_tokenizer!r}")
        if alphabet_size is not None and (text_tokenizer != "char_bpe" or alphabet_size < 1):
            raise ValueError(f"data.alphabet_size must be null or >= 1, and only with data.text_tokenizer=char_bpe; "
                             f"got {alphabet_size} with {text_tokenizer!r}")
        self.bpe_dropout = float(bpe_dropout)
        if speakers < 0:
            raise ValueError(f"data.speakers must be >= 0 (0 = no voices), got {speakers}")
        if not 0.0 <= speaker_dropout < 1.0:
            raise ValueError(f"data.speaker_dropout must be in [0, 1), got {speaker_dropout}")
        self.speaker_dropout = float(speaker_dropout)
        for key, val in (("seq_len", seq_len), ("batch_size", batch_size), ("train_rows", train_rows),
                         ("val_rows", val_rows), ("text_len", text_len)):
            if val < 1:
                raise ValueError(f"data.{key} must be >= 1, got {val}")
        self.visual_tokenizer, self.audio_tokenizer = visual_tokenizer, audio_tokenizer
        self.visual_tokenizer_stages = list(visual_tokenizer_stages or [])
        self.cache_dir = Path(cache_dir)
        self.seq_len, self.batch_size, self.train_rows, self.val_rows = seq_len, batch_size, train_rows, val_rows
        self.task_weights, self.caption_dropout, self.text_len = weights, caption_dropout, text_len
        self.seed, self.num_workers = seed, num_workers
        self.corpus_cfg = dict(image_size=image_size, num_frames=num_frames, clip_seconds=clip_seconds,
                               sample_rate=sample_rate, num_videos=num_videos, num_images=num_images,
                               num_audio=num_audio, val_videos=val_videos, val_images=val_images, val_audio=val_audio,
                               num_people=num_people, val_fraction=val_fraction, vocab_size=vocab_size,
                               data_seed=data_seed, eval_seed=eval_seed, text_seed=text_seed, source=str(source),
                               text_source=text_source, on_bad_file=on_bad_file, clips_per_video=clips_per_video,
                               clip_stride=clip_stride, text_tokenizer=text_tokenizer, alphabet_size=alphabet_size,
                               speakers=int(speakers))
        self.corpus: Optional[MultimodalCorpus] = None
        self.datasets: dict = {}

    @property
    def num_bad_files(self) -> int:
        """Manifest files left out under on_bad_file=skip."""
        return int(self.corpus.info.get("bad_files", 0)) if self.corpus is not None else 0

    @property
    def vocab(self) -> Vocabulary:
        self._require_setup()
        return self.corpus.vocab

    def _require_setup(self) -> None:
        if self.corpus is None:
            raise RuntimeError("MultimodalDataModule.setup() has not run")

    def _check_tokenizers(self) -> None:
        for key, val in (("visual_tokenizer", self.visual_tokenizer), ("audio_tokenizer", self.audio_tokenizer)):
            if not val:
                raise ValueError(f"data.{key} is not set: give a tokenizer checkpoint, or list it under `requires`")
        for i, val in enumerate(self.visual_tokenizer_stages):
            if not val:
                raise ValueError(f"data.visual_tokenizer_stages.{i} is not set: give a tokenizer checkpoint, or list "
                                 f"it under `requires` (requires.data.visual_tokenizer_stages.{i})")

    def prepare_data(self) -> None:
        """Build the token cache once (local rank 0; the other ranks wait, then load it in setup)."""
        self._check_tokenizers()
        MultimodalCorpus.build_or_load(self.corpus_cfg, self.visual_tokenizer, self.audio_tokenizer, self.cache_dir,
                                       self.visual_tokenizer_stages)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.corpus is not None:
            return
        self._check_tokenizers()
        self.corpus = MultimodalCorpus.build_or_load(self.corpus_cfg, self.visual_tokenizer, self.audio_tokenizer,
                                                     self.cache_dir, self.visual_tokenizer_stages)
        for task, w in self.task_weights.items():
            medium = task.split("_")[0]
            if w > 0 and task != "text" and len(self.corpus.splits["train"][medium]) == 0:
                raise ValueError(f"data.task_weights.{task}={w} but the data has no {medium} items "
                                 f"(give that task weight 0)")
        if self.corpus.info.get("bad_files"):
            log.warning("multimodal data: %d bad files were skipped (data.on_bad_file=skip)", self.corpus.info["bad_files"])
        longest = self.longest_document()
        if longest > self.seq_len:
            raise ValueError(f"data.seq_len={self.seq_len} is shorter than the longest document ({longest} tokens: "
                             "a video generation document); raise it or give that task weight 0")
        if self.mode == "captions":
            self.datasets = {"train": CaptionPrompts(self.corpus, "train", self.caption_media, balanced=True),
                             "val": CaptionPrompts(self.corpus, "val", self.caption_media, self.val_prompts)}
            return
        for split, rows in (("train", self.train_rows), ("val", self.val_rows)):
            self.datasets[split] = RowDataset(self.corpus, split, rows, self.seq_len, self.task_weights,
                                              self.caption_dropout if split == "train" else 0.0, self.text_len,
                                              self.seed if split == "train" else 0,
                                              self.bpe_dropout if split == "train" else 0.0,
                                              self.speaker_dropout if split == "train" else 0.0)

    def longest_document(self) -> int:
        """Tokens of the longest non-text document a positive task weight can draw (longest caption)."""
        c = self.corpus
        tr = c.splits["train"]
        scales = c.info["scales"]
        per_frame = sum(h * w for h, w in scales)
        spk = tr.get("audio_speakers")  # a speaker token opens audio generation documents
        cap_len = {k: max((len(c.vocab.encode(x)) for caps in tr[k] for x in caps), default=0)
                   for k in ("video_captions", "image_captions", "audio_captions")}
        lengths = {"text": 0,
                   "image_und": 4 + tr["image"].shape[3] * tr["image"].shape[4] // 4 + cap_len["image_captions"],
                   "image_gen": 3 + per_frame + cap_len["image_captions"],
                   "video_und": 4 + tr["video"].shape[1] * tr["video"].shape[3] * tr["video"].shape[4] // 4
                   + cap_len["video_captions"],
                   "video_gen": 3 + tr["video"].shape[1] * per_frame + cap_len["video_captions"],
                   "audio_und": 4 + tr["audio"].shape[1] + cap_len["audio_captions"],
                   "audio_gen": 3 + int(spk is not None and bool((spk >= 0).any())) + tr["audio"].shape[1]
                   + cap_len["audio_captions"]}
        return max(lengths[t] for t, w in self.task_weights.items() if w > 0)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        ds = self.datasets["train"]
        sampler = self._make_train_sampler(len(ds), f"data.train_rows={len(ds)} gives this rank less than one batch")
        return DataLoader(ds, batch_size=self.per_rank_batch_size(), sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=self._collate)

    @property
    def _collate(self):
        return collate_prompts if self.mode == "captions" else collate_rows

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        ds = self.datasets["val"]
        return DataLoader(ds, batch_size=self.per_rank_batch_size(), sampler=self._make_eval_sampler(len(ds)),
                          num_workers=self.num_workers, collate_fn=self._collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device) if isinstance(batch, UnifiedBatch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx)
