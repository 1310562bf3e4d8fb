"""Evaluate an ERNIE 5.0 checkpoint on the held-out split of its multimodal corpus (other seeds).

    python tools/eval_ernie5.py RUN/checkpoints/last.ckpt [--num 32] [--text-baseline TEXT_ONLY.ckpt] [--out X.json]
        [--understanding-only] [--audio-only] [--audio-judge AUDIO_TEACHER.ckpt] [--voice-judge VOICE_TEACHER.ckpt]

Understanding: the greedy caption of each held-out image / video / sound, parsed back into fields
(`datamodules.captions.caption_fields`) and compared with the truth: the main (large) object's colour
and shape, the video's motion direction, the background; the sound's kind. Beside it, the
teacher-forced loss of the true captions (`caption_loss`, per medium, held-out rows of that task only),
and `attribute_ranking`: for each held-out image / video, its true caption (template 0) against the
same caption with the main object's colour (or shape) word replaced by every other colour (shape);
the item counts as read when the true one is the most likely. Far more sensitive than greedy
captions at small scale (chance = 1 / the number of candidates). `--understanding-only` stops there.
Generation: caption -> image / video (classifier-free guidance) and description -> sound, judged by
probe classifiers trained on the REAL tokenized train split (visual: the main object's colour, shape,
the background and the video's direction from the quantized latent; audio: the sound's kind from the
codes); each probe's own accuracy on the real held-out items is reported beside it (the ceiling).
`--audio-only` evaluates the sound tasks alone (e.g. a run on audio documents only). `--audio-judge`
(an `experiment=audio_teacher` checkpoint) also names the kind of each decoded generated sound with that
frame classifier, one judge for every audio tokenizer (the code probes are each tokenizer's own), with
its accuracy on the decoded real held-out sounds beside it. With speakers, `--voice-judge` (an
`experiment=audio_teacher data.labels=voice` checkpoint) names the voice of the decoded sounds the same
way, per kind of sound, and the teacher-forced speaker NLL is split by kind too.
Text: the model's next-token loss on held-out biography rows; with --text-baseline, the same for a
text-only model (the "seesaw" question).
Elastic sub-models (`--grid`, e.g. after `experiment=ernie5_elastic`): for every (depth, routed experts
kept per layer, top-k) of --depths x --experts x --top-k, the teacher-forced held-out loss of each
modality and the sub-model's total / activated parameters. The sub-model is the one the module's elastic
knobs select (lit_modules/trunk.py): the first and last layer with a centred span dropped, each layer's
most used experts. With --grid only the grid is evaluated (no generation).
Prints one JSON object (and writes it atomically with --out).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.captions import (COLOUR_NAMES, SHAPE_WORDS, VISUAL_FIELDS, caption_fields, caption_hits,  # noqa: E402
                                  visual_labels)
from datamodules.multimodal import item_pixels  # noqa: E402
from models.io import atomic_write_text, load_checkpoint  # noqa: E402

AUDIO_KINDS = ("tone", "chord", "chirp", "clicks", "noise_burst")


def load(ckpt: str, device: str = "cpu"):
    """(module, DataModule set up on the checkpoint's own data config)."""
    from datamodules.multimodal import MultimodalDataModule
    from lit_modules.ernie5 import Ernie5Module

    raw = load_checkpoint(ckpt, what="ERNIE 5.0 checkpoint")
    data = raw.get("datamodule_hyper_parameters")
    if not data:
        raise ValueError(f"{ckpt} records no data config (datamodule_hyper_parameters); was it written by train.py?")
    dm = MultimodalDataModule(**{k: v for k, v in data.items() if not k.startswith("_")})
    dm.setup()
    module = Ernie5Module.load_from_checkpoint(ckpt, map_location=device, weights_only=True).eval()
    module._tokenizers_to(device)
    module.checkpoint_step = int(raw.get("global_step", 0))
    return module, dm


# ------------------------------------------------------------------------------------------ probes


class Probe:
    """Linear classifiers (one per field) on standardised features, trained full-batch with AdamW."""

    def __init__(self, x: torch.Tensor, labels: dict[str, list], steps: int = 300, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-4)
        z = (x - self.mean) / self.std
        self.heads, self.classes = {}, {}
        for name, ys in labels.items():
            classes = sorted({y for y in ys if y is not None})
            if len(classes) < 2:
                continue
            keep = torch.tensor([y is not None for y in ys])
            y = torch.tensor([classes.index(v) for v in ys if v is not None])
            head = torch.nn.Linear(z.shape[1], len(classes))
            opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(head(z[keep]), y).backward()
                opt.step()
            self.heads[name], self.classes[name] = head.eval(), classes

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, list]:
        z = (x - self.mean) / self.std
        return {n: [self.classes[n][i] for i in h(z).argmax(-1).tolist()] for n, h in self.heads.items()}


def majority(train: list[dict], truth: list[dict], fields) -> dict[str, float]:
    """Accuracy of always answering the train split's most frequent value of each field (the chance row)."""
    from collections import Counter

    out = {}
    for f in fields:
        common = Counter(t[f] for t in train if t.get(f) is not None).most_common(1)
        if common:
            out[f] = accuracy({f: [common[0][0]] * len(truth)}, truth).get(f, 0.0)
    return out


def accuracy(pred: dict[str, list], truth: list[dict]) -> dict[str, float]:
    out = {}
    for name, ps in pred.items():
        pairs = [(p, t[name]) for p, t in zip(ps, truth) if t.get(name) is not None]
        if pairs:
            out[name] = sum(p == t for p, t in pairs) / len(pairs)
    return out


@torch.no_grad()
def quantized(vtok, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Stored latents [N, T', d, H, W] -> their quantized reconstruction, flattened [N, T' d H W]."""
    out = []
    for s in range(0, latents.shape[0], batch):
        z = latents[s:s + batch].transpose(1, 2)
        out.append(vtok.tokens_to_features(vtok.features_to_tokens(z)).flatten(1))
    return torch.cat(out)


def audio_features(codes: torch.Tensor, codebook: int) -> torch.Tensor:
    """Codes [N, F, Q] -> per-level code histograms [N, Q * G] (order-free: a sound's kind is spectral)."""
    one = F.one_hot(codes, codebook).float().mean(1)
    return one.flatten(1)


def code_information(codes: torch.Tensor, labels: torch.Tensor, codebook: int) -> dict:
    """Plug-in mutual information (nats) between one code and a per-sound label (e.g. the voice), per RVQ
    level, over every frame of codes [N, F, Q] (each frame carries its sound's label), with each level's
    code entropy: how much a single code can say about the label."""
    N, Fr, Q = codes.shape
    lab = labels.long().view(N, 1).expand(N, Fr).reshape(-1)
    L = int(lab.max()) + 1
    out = {"mi": [], "code_entropy": []}
    for q in range(Q):
        joint = torch.zeros(codebook * L, dtype=torch.float64)
        joint.index_add_(0, codes[:, :, q].reshape(-1).long() * L + lab, torch.ones(N * Fr, dtype=torch.float64))
        p = (joint / joint.sum()).view(codebook, L)
        pc, pl = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        nz = p > 0
        out["mi"].append(float((p[nz] * (p[nz] / (pc * pl).expand_as(p)[nz]).log()).sum()))
        out["code_entropy"].append(float(-(pc[pc > 0] * pc[pc > 0].log()).sum()))
    return out


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(module, dm, num: int = 32, seed: int = 0, guidance: float | None = None,
             text_baseline=None, text_rows: int = 32, understanding_only: bool = False,
             audio_only: bool = False, audio_judge=None, voice_judge=None) -> dict:
    """audio_only: the sound tasks only (no image or video understanding or generation).
    audio_judge: an `AudioFrameClassifier` (`experiment=audio_teacher`) that names the kind of the decoded
    waveforms of generated and of real held-out sounds: one judge for every audio tokenizer.
    voice_judge: the same for the voices (`experiment=audio_teacher data.labels=voice data.speakers=N`)."""
    dev = module.device
    media = ("audio",) if audio_only else ("image", "video", "audio")
    visual = [m for m in media if m != "audio"]
    tr, va = dm.corpus.splits["train"], dm.corpus.splits["val"]
    vtok, atok = module.visual_tokenizer, module.audio_tokenizer
    gen = torch.Generator(device=dev).manual_seed(seed)
    res: dict = {"checkpoint_step": int(getattr(module, "checkpoint_step", 0)), "num": num}
    greedy = {"temperature": 0.0, "max_new_tokens": 64}

    # understanding: caption each held-out item greedily and parse it
    und = {}
    for medium in media:
        n = min(num, len(va[medium]))
        hits: dict[str, list] = {}
        for i in range(n):
            text = module.caption(medium, va[medium][i], gen, pixels=item_pixels(va, medium, i), **greedy)
            for k, ok in caption_hits(medium, text, va[f"{medium}_captions"][i][0]).items():
                hits.setdefault(k, []).append(ok)
            if medium != "audio":
                hits.setdefault("parsed", []).append(bool(caption_fields(text).get("objects")))
        und[medium] = {k: sum(v) / len(v) for k, v in hits.items()}
        if medium == "audio":
            kinds_tr = [{"kind": caption_fields(c[0]).get("sound")} for c in tr["audio_captions"]]
            kinds_va = [{"kind": caption_fields(c[0]).get("sound")} for c in va["audio_captions"][:n]]
            und[medium]["chance"] = majority(kinds_tr, kinds_va, ["kind"])
        else:
            lab_tr = [visual_labels(c[0]) for c in tr[f"{medium}_captions"]]
            lab_va = [visual_labels(c[0]) for c in va[f"{medium}_captions"][:n]]
            und[medium]["chance"] = majority(lab_tr, lab_va, VISUAL_FIELDS)
    res["understanding"] = und
    # teacher-forced: the NLL of the true captions of held-out images / videos / sounds
    res["caption_loss"] = {m: text_loss(module, dm, text_rows, f"{m}_und") for m in media}
    res["attribute_ranking"] = {m: attribute_ranking(module, va, m, num) for m in visual}
    if understanding_only:
        res["params"] = module.net.num_params()
        return res

    # generation: probes trained on real tokenized train items, scored on real held-out items and on samples
    gen_res = {}
    for medium in visual:
        n = min(num, len(va[medium]))
        x_tr = quantized(vtok, tr[medium].to(dev)).cpu()
        y_tr = [visual_labels(c[0]) for c in tr[f"{medium}_captions"]]
        fields = [f for f in VISUAL_FIELDS if medium == "video" or f != "direction"]
        probe = Probe(x_tr, {f: [y[f] for y in y_tr] for f in fields})
        truth = [visual_labels(c[0]) for c in va[f"{medium}_captions"][:n]]
        real = accuracy(probe.predict(quantized(vtok, va[medium][:n].to(dev)).cpu()), truth)
        frames = va[medium].shape[1]
        samples = []
        for i in range(n):
            tokens, _ = module.render(va[f"{medium}_captions"][i][0], medium, frames, gen, guidance=guidance)
            samples.append(vtok.tokens_to_features(tokens).flatten(1).cpu())
        generated = accuracy(probe.predict(torch.cat(samples)), truth)
        gen_res[medium] = {"probe_on_real": real, "generated": generated, "chance": majority(y_tr, truth, fields)}
    n = min(num, len(va["audio"]))
    G = atok.cfg.codebook_size
    kinds = [caption_fields(c[0]).get("sound") for c in tr["audio_captions"]]
    probe = Probe(audio_features(tr["audio"], G), {"kind": kinds})
    truth = [{"kind": caption_fields(c[0]).get("sound")} for c in va["audio_captions"][:n]]
    real = accuracy(probe.predict(audio_features(va["audio"][:n], G)), truth)
    frames = va["audio"].shape[1]
    voices = speaker_targets(module, va, n)  # [(voice asked for, its reference clip)] or None
    refs = [None] * n if voices is None else [r for _, r in voices]
    codes = torch.cat([module.speak(va["audio_captions"][i][0], frames, gen, reference=refs[i])[0].cpu()
                       for i in range(n)])
    gen_res["audio"] = {"probe_on_real": real, "generated": accuracy(probe.predict(audio_features(codes, G)), truth),
                        "chance": majority([{"kind": k} for k in kinds], truth, ["kind"])}
    if voices is not None:  # did the speaker token set the voice? a voice probe on real sounds
        vprobe = Probe(audio_features(tr["audio"], G), {"voice": tr["audio_speakers"].tolist()})
        own = [{"voice": int(v)} for v in va["audio_speakers"][:n]]
        asked = [{"voice": v} for v, _ in voices]
        gen_res["audio"]["voice"] = {
            "probe_on_real": accuracy(vprobe.predict(audio_features(va["audio"][:n], G)), own)["voice"],
            "generated": accuracy(vprobe.predict(audio_features(codes, G)), asked)["voice"],
            "generated_matches_caption_item": accuracy(vprobe.predict(audio_features(codes, G)), own)["voice"],
            "chance": majority([{"voice": int(v)} for v in tr["audio_speakers"]], asked, ["voice"])["voice"],
            "nll": speaker_nll(module, dm, n),
            "code_information": code_information(tr["audio"], tr["audio_speakers"], G)}
    if audio_judge is not None:
        gen_res["audio"]["judge"] = judge_sounds(audio_judge, atok, va["audio"][:n], codes, truth)
    if voice_judge is not None:
        if voices is None:
            raise ValueError("--voice-judge needs a checkpoint trained with speakers (data.speakers > 0)")
        bank = int(tr["audio_speakers"].max()) + 1
        if voice_judge.cfg.num_classes != bank:
            raise ValueError(f"--voice-judge names {voice_judge.cfg.num_classes} classes, the corpus has {bank} "
                             "voices: train it with experiment=audio_teacher data.labels=voice "
                             f"data.speakers={bank}")
        gen_res["audio"]["voice"]["judge"] = judge_voices(
            voice_judge, atok, va["audio"][:n], [int(v) for v in va["audio_speakers"][:n]], codes,
            [v for v, _ in voices], [t["kind"] for t in truth])
    res["generation"] = gen_res

    # text: next-token loss on held-out biography rows (text documents only)
    nll = text_nll(module, dm, text_rows)  # scored once: nats per token and bits per byte
    res["text_loss"], res["text_bits_per_byte"] = nll["nats_per_token"], nll["bits_per_byte"]
    if text_baseline is not None:
        res["text_loss_baseline"] = text_loss(text_baseline, dm, text_rows)
    res["params"] = module.net.num_params()
    return res


@torch.no_grad()
def judged_classes(judge, atok, codes: torch.Tensor) -> list[int]:
    """The class a frame classifier gives each sound decoded from codes [N, F, Q] (argmax of its frames'
    mean logits)."""
    dev = next(judge.parameters()).device
    out = []
    for s in range(0, len(codes), 16):
        wave = atok.decode_wave(codes[s:s + 16].to(next(atok.parameters()).device)).to(dev)
        out += [int(i) for i in judge(wave).float().mean(1).argmax(-1)]
    return out


def judge_sounds(judge, atok, real_codes: torch.Tensor, generated_codes: torch.Tensor, truth: list[dict]) -> dict:
    """Accuracy of a frame classifier of the synthetic sound classes at naming the kind of waveforms
    decoded from codes: on the real held-out sounds' codes (the tokenizer's and the judge's ceiling
    together) and on the generated ones. Unlike the code probes this judge is the same for every audio
    tokenizer."""
    from datamodules.synthetic_audio import AUDIO_CLASSES

    def kinds(codes):
        return {"kind": [AUDIO_CLASSES[i] for i in judged_classes(judge, atok, codes)]}

    return {"on_decoded_real": accuracy(kinds(real_codes), truth)["kind"],
            "generated": accuracy(kinds(generated_codes), truth)["kind"]}


def judge_voices(judge, atok, real_codes: torch.Tensor, own: list[int], generated_codes: torch.Tensor,
                 asked: list[int], kinds: list[str]) -> dict:
    """A frame classifier of the voices (`experiment=audio_teacher data.labels=voice`) on decoded sounds:
    how often it names the real held-out sounds' own voice (its ceiling with this tokenizer) and the voice
    each generated sound was asked for, overall and per kind of sound (the voices are a filter on the
    sound, audible on broadband kinds and much less on pure tones)."""
    real, generated = judged_classes(judge, atok, real_codes), judged_classes(judge, atok, generated_codes)

    def rate(pred, want, keep):
        hits = [p == w for p, w, k in zip(pred, want, keep) if k]
        return sum(hits) / len(hits) if hits else float("nan")

    every = [True] * len(kinds)
    return {"on_decoded_real": rate(real, own, every), "generated": rate(generated, asked, every),
            "by_kind": {k: {"on_decoded_real": rate(real, own, [x == k for x in kinds]),
                            "generated": rate(generated, asked, [x == k for x in kinds]),
                            "n": kinds.count(k)} for k in sorted(set(kinds))}}


@torch.no_grad()
def speaker_nll(module, dm, n: int) -> dict:
    """Teacher-forced audio NLL (mean over frames and code levels) of the first n held-out descriptions'
    sounds, their document opened by a reference of the sound's own voice (`matched`), of the next voice
    in the bank (`other_voice`), or by no speaker token (`none`): whether the network reads the voice
    from the reference at all, more sensitively than sampling does. Every mode scores the same `n` sounds
    (those with a reference clip of both voices). `by_kind` splits it by the kind of sound (the voice is
    audible on broadband kinds, far less on pure tones)."""
    from datamodules.multimodal import collate_rows, pack_documents
    from models.ernie5 import MODALITIES, SPAN_TOKENS, TASKS, DocumentBuilder

    split, v = dm.corpus.splits["val"], dm.corpus.vocab
    spk = split["audio_speakers"]
    voices = sorted({int(x) for x in spk.tolist() if x >= 0})
    scales = [tuple(x) for x in dm.corpus.info["scales"]]
    open_, close = SPAN_TOKENS["audio"]
    # the same sounds in every mode: those with a reference of their own voice and of the next one
    refs = {}
    for i in [i for i in range(min(n, len(spk))) if int(spk[i]) >= 0]:
        own = voices.index(int(spk[i]))
        pair = {"matched": module.reference_clip(split, i, voices[own]),
                "other_voice": module.reference_clip(split, i, voices[(own + 1) % len(voices)])}
        if all(r is not None for r in pair.values()):
            refs[i] = pair
    items = list(refs)
    res: dict = {"n": len(items), "by_kind": {}}
    for mode in ("matched", "other_voice", "none"):
        rows, kinds = [], []
        for i in items:
            b = DocumentBuilder(MODALITIES.index("audio"), TASKS.index("audio_gen"), scales)
            media = []
            if mode != "none":
                b.speaker()
                media.append(("speaker", "audio_gen", refs[i][mode]))
            b.text(v.encode(split["audio_captions"][i][0]) + [v[open_]]).audio(split["audio"][i].shape[0])
            media.append(("audio", "audio_gen", split["audio"][i]))
            rows.append((b.text([v[close], v.eos]).finish(), media))
            kinds.append(caption_fields(split["audio_captions"][i][0]).get("sound"))
        S = max((len(d["ids"]) for d, _ in rows), default=1)
        rows = [pack_documents([(d, media, 0)], S) for d, media in rows]
        per_row = []  # (summed NLL, codes) of each row's one sound
        for s in range(0, len(rows), 8):
            out = module.net(collate_rows(rows[s:s + 8]).to(module.device), [], mtp=False)
            logits, codes = out.audio["audio_gen"]
            nll = sum(F.cross_entropy(lg.transpose(1, 2).float(), codes[..., j], reduction="none").sum(1)
                      for j, lg in enumerate(logits))  # [rows]
            per_row += [(float(x), codes[r, :, 0].numel() * len(logits)) for r, x in enumerate(nll)]
        res[mode] = sum(t for t, _ in per_row) / max(1, sum(c for _, c in per_row))
        for k in sorted(set(kinds)):
            sel = [pr for pr, kk in zip(per_row, kinds) if kk == k]
            res["by_kind"].setdefault(k, {})[mode] = sum(t for t, _ in sel) / max(1, sum(c for _, c in sel))
    return res


def speaker_targets(module, split: dict, n: int) -> Optional[list]:
    """For held-out description i < n: the voice to speak it in, cycling through the voices independently of
    the sound the description came from, and a reference clip in that voice (None: no speakers)."""
    spk = split.get("audio_speakers")
    if module.net.speaker_enc is None or spk is None or not bool((spk >= 0).any()):
        return None
    voices = sorted({int(v) for v in spk.tolist() if v >= 0})
    out = []
    for i in range(n):
        v = voices[i % len(voices)]
        out.append((v, module.reference_clip(split, i, voice=v)))
    return out


ATTRIBUTE_WORDS = {"colour": COLOUR_NAMES, "shape": SHAPE_WORDS}


@torch.no_grad()
def caption_logprobs(module, medium: str, items: list, pixels: list, captions: list[str], chunk: int = 32) -> list[float]:
    """Teacher-forced log-probability of each caption (its tokens and EOS) after `<boX> item <eoX> <sep>`."""
    from datamodules.multimodal import caption_document, collate_rows, pack_documents

    v, out_lp = module.vocab, []
    for s in range(0, len(captions), chunk):
        resp = [v.encode(c) + [v.eos] for c in captions[s:s + chunk]]
        docs = [caption_document(v, module.net.scales, medium, x, r, px)
                for x, px, r in zip(items[s:s + chunk], pixels[s:s + chunk], resp)]
        S = max(len(d["ids"]) for d, _ in docs)
        rows = []
        for (doc, media), r in zip(docs, resp):
            row = pack_documents([(doc, media, 0)], S)
            n = len(doc["ids"])
            row["text_targets"].fill_(-100)  # only the caption is scored
            row["text_targets"][n - len(r) - 1:n - 1] = torch.as_tensor(r, dtype=torch.long)
            rows.append(row)
        out = module.net(collate_rows(rows).to(module.device), [], mtp=False)
        lp = F.log_softmax(out.text_logits.float(), -1).gather(-1, out.text_targets[:, None]).squeeze(-1)
        out_lp += [float(x.sum()) for x in lp.split([len(r) for r in resp])]
    return out_lp


@torch.no_grad()
def attribute_ranking(module, split: dict, medium: str, num: int) -> dict:
    """Per field (colour, shape): the fraction of held-out items whose true caption outranks every
    variant naming another value for the main object, and the candidates' count (chance = 1 / it)."""
    from datamodules.multimodal import item_pixels

    res = {}
    for field, words in ATTRIBUTE_WORDS.items():
        hits, n_cand = [], len(words)
        for i in range(min(num, len(split[medium]))):
            cap = split[f"{medium}_captions"][i][0]
            lab = visual_labels(cap)
            phrase = f"large {lab['colour']} {lab['shape']}"
            if lab[field] is None or phrase not in cap:
                continue  # no large main object named as "large <colour> <shape>"
            variants = [cap.replace(phrase, phrase.replace(f" {lab[field]}", f" {w}"), 1) for w in words]
            truth = words.index(lab[field])
            lp = caption_logprobs(module, medium, [split[medium][i]] * n_cand, [item_pixels(split, medium, i)] * n_cand,
                                  variants)
            hits.append(max(range(n_cand), key=lp.__getitem__) == truth)
        res[field] = sum(hits) / len(hits) if hits else None
        res[f"{field}_items"], res[f"{field}_candidates"] = len(hits), n_cand
    return res


@torch.no_grad()
def text_loss(module, dm, rows: int, task: str = "text") -> float:
    """Mean next-token cross-entropy of the text tokens of held-out rows made of `task` documents only
    (text: biographies; X_und: the captions after `<boX> item <eoX> <sep>`)."""
    return text_nll(module, dm, rows, task)["nats_per_token"]


def target_bytes(vocab, ids) -> int:
    """UTF-8 bytes of the text a run of target ids spells (each EOS counts as one byte, a boundary token as
    none): the denominator that makes losses of different text tokenizers comparable."""
    total, run = 0, []
    for i in [int(i) for i in ids] + [vocab.eos]:
        if i == vocab.eos or i >= vocab.base:
            total += len(vocab.bpe.decode(run).encode("utf-8")) if run else 0
            total += int(i == vocab.eos)
            run = []
        else:
            run.append(i)
    return total - 1  # the sentinel EOS


@torch.no_grad()
def heldout_text_nll(module, dm, max_docs: Optional[int] = None, batch_size: int = 8) -> dict:
    """Teacher-forced NLL of every held-out text document, whole: each is cut into consecutive windows of
    `data.text_len` tokens (a training text document's length), packed into rows. The first token of a
    window has no context and is not scored. Every tokenizer thus scores the same characters, and bits
    per UTF-8 byte compares them (`unscored_bytes` are the windows' first tokens)."""
    from datamodules.multimodal import pack_documents
    from models.ernie5 import TASKS, DocumentBuilder

    vocab, W, S = dm.corpus.vocab, dm.text_len, dm.seq_len
    docs = dm.corpus.splits["val"]["text"][:max_docs]
    scales = [tuple(x) for x in dm.corpus.info["scales"]]
    rows, cur, used, unscored = [], [], 0, 0
    for ids in docs:
        for s in range(0, len(ids), min(W, S)):
            w = ids[s:s + min(W, S)]
            unscored += target_bytes(vocab, w[:1])
            if len(w) < 2:
                continue
            if used + len(w) > S:
                rows.append(pack_documents(cur, S))
                cur, used = [], 0
            cur.append((DocumentBuilder(0, TASKS.index("text"), scales).text(w).finish(), [], used))
            used += len(w)
    if cur:
        rows.append(pack_documents(cur, S))
    return {**score_text(module, vocab, rows, batch_size), "unscored_bytes": unscored, "documents": len(docs)}


@torch.no_grad()
def score_text(module, vocab, rows: list, batch_size: int = 8) -> dict:
    """Teacher-forced NLL of the text targets of packed rows: nats per token and bits per UTF-8 byte
    (tokenizer-independent), with the token and byte counts."""
    from datamodules.multimodal import collate_rows

    total, count, nbytes = 0.0, 0, 0
    for s in range(0, len(rows), batch_size):
        batch = collate_rows(rows[s:s + batch_size]).to(module.device)
        out = module.net(module.stage_view(batch), [], mtp=False)
        total += float(F.cross_entropy(out.text_logits.float(), out.text_targets, reduction="sum"))
        count += out.text_targets.numel()
        nbytes += target_bytes(vocab, out.text_targets.tolist())
    return {"nats_per_token": total / max(1, count), "bits_per_byte": total / math.log(2) / max(1, nbytes),
            "tokens": count, "bytes": nbytes}


def text_nll(module, dm, rows: int, task: str = "text") -> dict:
    """`score_text` of `rows` held-out rows of `task` documents only."""
    from datamodules.multimodal import RowDataset

    ds = RowDataset(dm.corpus, "val", rows, dm.seq_len, {task: 1.0}, 0.0, dm.text_len, 0)
    return score_text(module, dm.corpus.vocab, [ds[i] for i in range(rows)])


@torch.no_grad()
def submodel_grid(module, dm, depths=None, experts=None, top_ks=None, max_batches: int = 8) -> list[dict]:
    """Held-out teacher-forced losses of elastic sub-models (see the module docstring). A None axis
    takes its default: depths from the family's minimum (`elastic_min_depth`, at least half) to L;
    experts E/2 and E; top-k 1..k. Every point sees the same validation batches."""
    from models.layers.elastic import depth_layers

    cfg = module.net.cfg
    L, E, k = cfg.n_layers, module.trunk.num_experts, cfg.moe.top_k
    lo = max(module.elastic_min_depth, math.ceil(L / 2))
    depths = list(range(lo, L + 1)) if depths is None else [int(d) for d in depths]
    bad = [d for d in depths if not module.elastic_min_depth <= d <= L]
    if bad:
        raise ValueError(f"--depths must be in [{module.elastic_min_depth}, {L}] (the audio levels read the last "
                         f"{module.elastic_min_depth} layers run), got {bad}")
    sparse = module.sparse
    if not sparse and (experts or top_ks):
        raise ValueError("--experts / --top-k need a sparse checkpoint (model.net.ffn=moe|moue)")
    experts = ([max(k, E // 2), E] if sparse else [None]) if experts is None else [int(e) for e in experts]
    top_ks = (list(range(1, k + 1)) if sparse else [None]) if top_ks is None else [int(t) for t in top_ks]
    batches = []
    for i, batch in enumerate(dm.val_dataloader()):
        if i >= max_batches:
            break
        batches.append(batch.to(module.device))
    from lit_modules.ernie5 import LOSS_TERMS

    params, trunk_full = module.net.num_params(), module.trunk.num_params()
    outside_trunk = params["total"] - trunk_full["total"]  # embeddings, merger, heads, MTP: every sub-model has them
    out = []
    for d in depths:
        for e in experts:
            for t in top_ks:
                if e is not None and t is not None and t > e:
                    continue  # a layer cannot pick more experts than it keeps
                module.elastic_layers = depth_layers(L, d)
                module.elastic_experts = None if e is None or e == E else e
                module.elastic_top_k = None if t is None or t == k else t
                try:
                    layers, routing = module.elastic_choice()
                finally:
                    module.elastic_layers = module.elastic_experts = module.elastic_top_k = None
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}
                for batch in batches:
                    res = module._losses(batch, corrupt=False, layers=layers, routing=routing)
                    for key, value in res["terms"].items():
                        n = res["counts"].get(key, 1)
                        sums[key] = sums.get(key, 0.0) + float(value) * n
                        counts[key] = counts.get(key, 0) + n
                trunk_sub = module.trunk.num_params(layers, routing)
                point = {"depth": d, "layers": layers or list(range(L)), "experts": e if e is not None else E,
                         "top_k": t if t is not None else k,
                         "params_total": outside_trunk + trunk_sub["total"],
                         "params_activated": outside_trunk + trunk_sub["activated"]}
                point.update({f"loss_{key}": sums[key] / counts[key] for key in sums})
                point["loss"] = sum(point.get(f"loss_{m}", 0.0) for m in LOSS_TERMS)
                out.append(point)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--num", type=int, default=32, help="held-out items per medium")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's sample.guidance)")
    p.add_argument("--text-baseline", default=None, help="a text-only ERNIE 5.0 checkpoint (same architecture)")
    p.add_argument("--text-rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--understanding-only", action="store_true", help="captioning (greedy and teacher-forced) only")
    p.add_argument("--audio-only", action="store_true", help="the sound tasks only (no image or video)")
    p.add_argument("--voice-judge", default=None,
                   help="a frame classifier of the voices (experiment=audio_teacher data.labels=voice data.speakers=N) "
                        "naming the voice of decoded real and generated sounds, overall and per kind")
    p.add_argument("--audio-judge", default=None,
                   help="an experiment=audio_teacher checkpoint that names the kind of decoded generated sounds")
    p.add_argument("--text-only", action="store_true",
                   help="held-out text NLL only, every held-out document whole: nats per token and bits per UTF-8 "
                        "byte (compares text tokenizers)")
    p.add_argument("--max-docs", type=int, default=None, help="--text-only: the first N held-out documents")
    p.add_argument("--grid", action="store_true", help="evaluate elastic sub-models only (see above)")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--experts", type=int, nargs="+", default=None, help="routed experts kept per layer")
    p.add_argument("--top-k", type=int, nargs="+", default=None)
    p.add_argument("--max-batches", type=int, default=8, help="validation batches per sub-model (--grid)")
    args = p.parse_args(argv)
    module, dm = load(args.ckpt, args.device)
    if args.grid:
        return _emit({"ckpt": str(args.ckpt), "step": module.checkpoint_step,
                      "submodels": submodel_grid(module, dm, args.depths, args.experts, args.top_k, args.max_batches)},
                     args.out)
    if args.text_only:
        return _emit({"ckpt": str(args.ckpt), "step": module.checkpoint_step,
                      "text_tokenizer": module.vocab.bpe.kind, "text_vocab": len(module.vocab),
                      **heldout_text_nll(module, dm, args.max_docs)}, args.out)
    baseline = None
    if args.text_baseline:
        from lit_modules.ernie5 import Ernie5Module

        baseline = Ernie5Module.load_from_checkpoint(args.text_baseline, map_location=args.device,
                                                     weights_only=True).eval()
        if baseline.vocab is None or baseline.vocab.bpe.hf_tokenizer.to_str() != module.vocab.bpe.hf_tokenizer.to_str():
            raise ValueError("--text-baseline must share the model's text vocabulary (the same corpus config)")
    judges = {}
    for flag, path in (("--audio-judge", args.audio_judge), ("--voice-judge", args.voice_judge)):
        if path:
            from models.tokenizers.semantic import load_teacher

            judges[flag] = load_teacher(path, expect_rate=module.audio_tokenizer.cfg.sample_rate).to(args.device)
            if not hasattr(judges[flag], "head"):
                raise ValueError(f"{flag} {path}: needs a frame classifier (experiment=audio_teacher), "
                                 "not a feature-only teacher")
    res = evaluate(module, dm, args.num, args.seed, args.guidance, baseline, args.text_rows, args.understanding_only,
                   args.audio_only, judges.get("--audio-judge"), judges.get("--voice-judge"))
    res["ckpt"] = str(args.ckpt)
    return _emit(res, args.out)


def _emit(res: dict, out: str | None) -> dict:
    """Print the result as JSON and, with --out, write it atomically."""
    text = json.dumps(res, indent=1, sort_keys=True, default=float)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
    return res


if __name__ == "__main__":
    main()
