"""Text tokenizers: BPE-dropout's cost and lengths, and what UTF-16BE byte fallback costs (one process, JSON).

    python benchmarks/text_tokenizer.py            # 1,000 biographies (900 to train, 100 held out), vocabulary 2048
    python benchmarks/text_tokenizer.py --quick    # small, for the test

For byte-level BPE (`bpe`) and character BPE with UTF-16BE byte fallback (`char_bpe`), trained on the
same text:
- tokens per character of held-out text at BPE-dropout p = 0, 0.1, 0.3 (seeded; p = 0 is the
  library's segmentation) and how many distinct segmentations 8 seeds give one sentence;
- encode time of the seeded merge loop (what the data pipeline runs when p > 0) against the
  library's encoder on the same documents, timed alternately, median of per-pair ratios, with an
  A/A pair (library vs library) for the noise floor;
- for `char_bpe`, the tokens of short texts with characters outside its alphabet (CJK, accented
  Latin, emoji), beside what they would be with a UTF-8 byte fallback instead.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from datamodules.synthetic_bios import generate_biographies  # noqa: E402
from models.tokenizers.text import build_tokenizer  # noqa: E402

FOREIGN = {
    "cjk": "日本語のテキストと中文的句子",
    "accented": "Çà et là, où señoras déjà naïves",
    "emoji": "🙂👍🏽🎉🚀",
}


def corpus(quick: bool) -> tuple[list[str], list[str]]:
    """Train / held-out biographies (ERNIE 5.0's text task; held out as its DataModule does)."""
    bios = generate_biographies(60 if quick else 1000, seed=0).documents
    held = bios[: max(2, len(bios) // 10)]
    return bios[len(held):], held


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    vocab = args.vocab_size or (400 if args.quick else 2048)
    repeats = args.repeats or (2 if args.quick else 8)
    train, held = corpus(args.quick)
    chars = sum(len(t) for t in held)
    out: dict = {"config": {"vocab_size": vocab, "train_texts": len(train), "held_out_texts": len(held),
                            "held_out_chars": chars, "repeats": repeats},
                 "torch": torch.__version__, "device": "cpu", "tokenizers": {}}
    for kind in ("bpe", "char_bpe"):
        tok = build_tokenizer(kind, texts=train, vocab_size=vocab)
        res: dict = {"vocab_size": tok.vocab_size, "tokens_per_char": {}}
        for pd in (0.0, 0.1, 0.3):
            n = sum(len(tok.encode(t, pd, random.Random(i) if pd else None)) for i, t in enumerate(held))
            res["tokens_per_char"][f"p={pd}"] = round(n / chars, 4)
        sentence = held[0].split(".")[0]
        res["segmentations_of_one_sentence_8_seeds_p0.1"] = len(
            {tuple(tok.encode(sentence, 0.1, random.Random(s))) for s in range(8)})

        def library():
            return [tok.encode(t) for t in held]

        def merge_loop():  # the seeded path with (almost) no dropout: the same segmentation, written out
            return [tok.encode(t, 1e-12, random.Random(0)) for t in held]

        ta, tb = alternate(library, library, repeats)
        aa = statistics.median(a / b for a, b in zip(ta, tb))
        ta, tb = alternate(library, merge_loop, repeats)
        res["merge_loop_over_library_time"] = round(statistics.median(b / a for a, b in zip(ta, tb)), 3)
        res["aa_ratio"] = round(aa, 3)
        res["library_ms_per_1k_chars"] = round(1e3 * statistics.median(ta) / chars * 1000, 3)
        if kind == "char_bpe":
            res["alphabet"] = len(tok.alphabet)
            res["foreign_text"] = {}
            for name, text in FOREIGN.items():
                outside = [c for c in text if c not in tok.alphabet]
                n16 = len(tok.encode(text))
                u16 = sum(len(c.encode("utf-16-be", errors="surrogatepass")) for c in outside)
                u8 = sum(len(c.encode("utf-8")) for c in outside)
                res["foreign_text"][name] = {"chars": len(text), "outside_alphabet": len(outside),
                                             "tokens_utf16be_fallback": n16,
                                             "tokens_if_utf8_fallback": n16 - u16 + u8}
        out["tokenizers"][kind] = res
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
