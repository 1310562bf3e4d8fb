"""Is the sound class in the audio tokenizer's first RVQ level? (papers.md 4.3: the first code carries the
semantics, distilled from a teacher; `experiment=audio_tokenizer_semantic`)

    python tools/audio_semantic_probe.py CKPT [--train-clips 1024] [--eval-clips 512] [--seconds 1.0]

Encodes fresh synthetic clips (train: seed 1000, held out: seed 2000; neither is the tokenizer's own
data), takes each clip's histogram of the codes of one level (order-free, as `tools/eval_ernie5.py`'s
audio probes), trains a linear probe of the sound class on the train clips and scores it on the held-out
ones: per level alone and all levels together. Per frame, `frame_accuracy`: each code of a level answers
the class most frequent among the train frames carrying it (how purely one code names the class; the
frames before a note's onset and after its release are silent in every class, so no level reaches 1).
Also the held-out mel L1 of decoding level 1 alone and all
levels (what the distillation costs the reconstruction). Prints JSON (and writes it with --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datamodules.synthetic_audio import render_synthetic_audio  # noqa: E402
from models.tokenizers.checkpoint import load_media_tokenizer  # noqa: E402
from tools.eval_ernie5 import Probe, _emit, accuracy  # noqa: E402


def probe_levels(tok, train_clips: int = 1024, eval_clips: int = 512, seconds: float = 1.0, batch: int = 64) -> dict:
    sr, G = int(tok.cfg.sample_rate), tok.cfg.codebook_size
    data = {}
    for split, n, seed in (("train", train_clips, 1000), ("eval", eval_clips, 2000)):
        wave, labels, names = render_synthetic_audio(n, seconds, sr, seed)
        codes = torch.cat([tok.encode(wave[s:s + batch]) for s in range(0, n, batch)])  # encode: no_grad
        data[split] = (wave, codes, [names[i] for i in labels.tolist()])
    Q = data["train"][1].shape[-1]

    def hist(codes: torch.Tensor, levels) -> torch.Tensor:
        return torch.cat([torch.nn.functional.one_hot(codes[..., j], G).float().mean(1) for j in levels], dim=1)

    out = {"levels": Q, "train_clips": train_clips, "eval_clips": eval_clips, "accuracy": {}}
    truth = [{"kind": k} for k in data["eval"][2]]
    for name, levels in [(f"level_{j + 1}", [j]) for j in range(Q)] + [("all_levels", list(range(Q)))]:
        probe = Probe(hist(data["train"][1], levels), {"kind": data["train"][2]})
        out["accuracy"][name] = accuracy(probe.predict(hist(data["eval"][1], levels)), truth)["kind"]
    # per frame: each code of a level names the class most frequent among the train frames that carry it
    # (a lookup table; unseen codes answer the overall majority); accuracy on the held-out frames
    out["frame_accuracy"] = {}
    classes = sorted(set(data["train"][2]))
    y_tr = torch.tensor([classes.index(k) for k in data["train"][2]])
    y_ev = torch.tensor([classes.index(k) for k in data["eval"][2]])
    for j in range(Q):
        c_tr, c_ev = data["train"][1][..., j], data["eval"][1][..., j]
        table = torch.zeros(G, len(classes))
        table.index_put_((c_tr.flatten(), y_tr[:, None].expand_as(c_tr).flatten()), torch.ones(c_tr.numel()),
                         accumulate=True)
        answer = torch.where(table.sum(1) > 0, table.argmax(1), torch.bincount(y_tr).argmax())
        out["frame_accuracy"][f"level_{j + 1}"] = float((answer[c_ev] == y_ev[:, None]).float().mean())
    wave, codes, _ = data["eval"]
    with torch.no_grad():
        mel = torch.cat([tok.log_mel(wave[s:s + batch]) for s in range(0, len(wave), batch)])
        for k in (1, Q):
            rec = torch.cat([tok.decode(codes[s:s + batch], k) for s in range(0, len(wave), batch)])
            out[f"mel_l1_levels_{k}"] = float((rec[..., :mel.shape[-1]] - mel).abs().mean())
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--train-clips", type=int, default=1024)
    p.add_argument("--eval-clips", type=int, default=512)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tok, _ = load_media_tokenizer(args.ckpt, expect_kind="audio")
    return _emit({"ckpt": str(args.ckpt), **probe_levels(tok, args.train_clips, args.eval_clips, args.seconds)},
                 args.out)


if __name__ == "__main__":
    main()
