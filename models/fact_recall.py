"""Fact recall of a causal language model on cloze probes: exact match of the greedy continuation
and the rank of the true object among the relation's candidates.

A probe is a dict {'text', 'start', 'end', 'answer', 'candidates', 'relation'} (the sentence, the
character span of the answer in it, the candidate objects, the answer among them), optionally
'answers' (every true object: a greedy continuation naming any of them is a match) and 'seen'
(whether the probe's wording was in the training text); `datamodules.synthetic_bios.fact_cloze_probes`
writes them, and ERNIE 3.0's masked-LM probe (tools/ernie3_probe.py) uses the same shape and the
same summary (`cloze_parts`, `recall_metrics`).

`model` is any callable mapping tokens [B, T] to next-token logits [B, T, V] (models.transformer.
Transformer, a LightningModule's forward); `tokenizer` has encode / decode / eos_id / pad_id.
Every row starts with EOS, the document separator of the packed training stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["candidate_scores", "cloze_parts", "exact_match", "fact_recall", "greedy_continuations", "rank_of",
           "recall_metrics"]

SCORES = ("mean", "sum")


def cloze_parts(probe: Mapping, lead: str = "") -> tuple[str, list[str], str]:
    """(text before the answer, each candidate as it continues that text, text after the answer).

    The left text loses its trailing space and each candidate gains it, as running text is tokenized
    (" Valmora" is one word). lead: prepended to the left text (ERNIE encodes sentences with a space).
    """
    before = lead + probe["text"][: probe["start"]]
    sep = " " if before.endswith(" ") else ""
    return before.rstrip(), [sep + c for c in probe["candidates"]], probe["text"][probe["end"]:]


def rank_of(scores: Sequence[float], answer: int) -> int:
    """1 + the number of other candidates scoring at least as high as the answer (ties count against it,
    so a model that scores every candidate alike ranks the answer last, not first)."""
    return 1 + sum(s >= scores[answer] for j, s in enumerate(scores) if j != answer)


def exact_match(continuation: str, answers: Sequence[str]) -> bool:
    """The continuation (leading spaces dropped) starts with one of `answers`, ending there at a word boundary."""
    text = continuation.lstrip()
    return any(text.startswith(a) and (len(text) == len(a) or not text[len(a)].isalnum()) for a in answers)


def recall_metrics(records: Sequence[Mapping]) -> dict:
    """Summary of scored probes, overall and per relation.

    records: {'relation', 'rank', 'num_candidates'} and optionally 'exact' (bool). Returns {'probes',
    'top1' (rank 1 accuracy), 'mrr' (mean 1 / rank), 'chance' (mean 1 / number of candidates),
    'exact' (when every record has it), 'per_relation': {relation: the same without 'chance'}}.
    """

    def stats(rs: Sequence[Mapping]) -> dict:
        n = len(rs)
        out = {"probes": n,
               "top1": sum(r["rank"] == 1 for r in rs) / n if n else 0.0,
               "mrr": sum(1.0 / r["rank"] for r in rs) / n if n else 0.0}
        if n and all("exact" in r for r in rs):
            out["exact"] = sum(bool(r["exact"]) for r in rs) / n
        return out

    by_rel: dict[str, list] = {}
    for r in records:
        by_rel.setdefault(r["relation"], []).append(r)
    out = stats(records)
    out["chance"] = sum(1.0 / r["num_candidates"] for r in records) / len(records) if records else 0.0
    out["per_relation"] = {rel: stats(rs) for rel, rs in sorted(by_rel.items())}
    return out


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def candidate_scores(model: Callable, tokenizer, probes: Sequence[Mapping], score: str = "mean",
                     batch_size: int = 64) -> list[list[float]]:
    """Per probe, each candidate's log-probability as the continuation of the text before the answer:
    summed over its tokens (`score="sum"`) or their mean (`"mean"`, fairer between long and short names)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    rows = []  # (probe index, prefix ids, candidate ids)
    for i, probe in enumerate(probes):
        left, cands, _ = cloze_parts(probe)
        prefix = [tokenizer.eos_id] + tokenizer.encode(left)
        rows.extend((i, prefix, tokenizer.encode(c)) for c in cands)
    device = _device(model)
    out: list[list[float]] = [[] for _ in probes]
    for a in range(0, len(rows), batch_size):
        chunk = rows[a : a + batch_size]
        T = max(len(p) + len(c) for _, p, c in chunk)
        x = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
        for r, (_, p, c) in enumerate(chunk):
            x[r, : len(p) + len(c)] = torch.tensor(p + c)
        # Right padding never reaches earlier positions of a causal model.
        logp = model(x[:, :-1].to(device)).float().log_softmax(-1).cpu()
        for r, (i, p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            lp = logp[r, pos, torch.tensor(c)]
            out[i].append(float(lp.mean() if score == "mean" else lp.sum()))
    return out


@torch.no_grad()
def greedy_continuations(model: Callable, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                         batch_size: int = 64, max_len: int | None = None) -> list[str]:
    """The greedy (argmax) continuation of each prompt, up to `max_new_tokens` tokens or EOS, decoded.

    Prompts of different lengths decode together, right-padded: each step runs the whole rows and
    reads every row's logits at its own last token (a causal model never sees the padding after it).
    max_len: the model's longest sequence (generation stops there).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    ids = [[eos] + tokenizer.encode(p) for p in prompts]
    device = _device(model)
    out = [""] * len(prompts)
    for a in range(0, len(ids), batch_size):
        rows = ids[a : a + batch_size]
        longest = max(len(r) for r in rows)
        steps = max_new_tokens if max_len is None else min(max_new_tokens, max_len - longest)
        if steps < 1:
            raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within max_len={max_len}")
        x = torch.full((len(rows), longest + steps), pad, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, : len(row)] = torch.tensor(row)
        x = x.to(device)
        cur = torch.tensor([len(r) for r in rows], device=device)  # where each row's next token goes
        start = cur.clone()
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        arange = torch.arange(len(rows), device=device)
        for _ in range(steps):
            logits = model(x[:, : int(cur.max())])
            nxt = logits[arange, cur - 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
            x[arange, cur] = nxt
            cur += 1
            if bool(done.all()):
                break
        for r in range(len(rows)):
            new = x[r, int(start[r]) : int(cur[r])].tolist()
            out[a + r] = tokenizer.decode(new[: new.index(eos)] if eos in new else new)
    return out


@torch.no_grad()
def fact_recall(model: Callable, tokenizer, probes: Sequence[Mapping], max_new_tokens: int = 24,
                score: str = "mean", batch_size: int = 64, max_len: int | None = None) -> dict:
    """Score `probes` (see the module docstring) and summarise with `recall_metrics`: over all probes,
    and under 'seen' / 'unseen' for probes whose 'seen' flag says so (a group with no probes is left
    out). Each record also carries the probe's greedy continuation under 'records'.

    max_new_tokens must cover the longest object (in tokens of `tokenizer`), or its probes cannot match.
    """
    if not probes:
        raise ValueError("fact_recall needs at least one probe")
    scores = candidate_scores(model, tokenizer, probes, score, batch_size)
    prompts = [cloze_parts(p)[0] for p in probes]
    conts = greedy_continuations(model, tokenizer, prompts, max_new_tokens, batch_size, max_len)
    records = []
    for p, s, cont in zip(probes, scores, conts):
        records.append({"relation": p["relation"], "rank": rank_of(s, list(p["candidates"]).index(p["answer"])),
                        "num_candidates": len(s), "exact": exact_match(cont, p.get("answers") or [p["answer"]]),
                        "seen": p.get("seen"), "prompt": prompts[len(records)], "answer": p["answer"],
                        "continuation": cont})
    out = recall_metrics(records)
    for name, flag in (("seen", True), ("unseen", False)):
        group = [r for r in records if r["seen"] is flag]
        if group:
            out[name] = recall_metrics(group)
    out["records"] = records
    return out
