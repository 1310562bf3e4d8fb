"""Knowledge-aligned text for ERNIE 3.0: sentences paired with the triples they state, entity spans,
and the inputs of the five pre-training tasks (papers.md 3.2).

Sources:
  * `bios` (default): the synthetic biographies re-rendered sentence by sentence from the same
    knowledge graph, so every sentence knows its triple and its template. Pre-training text uses
    `train_templates` (default 0-2 of each relation's four); the held-out template (3) and the
    held-out people (the validation split) are for evaluation (probing, fine-tuning tests).
  * a JSONL file or folder: `{"text": ..., "triples": [[head, relation, tail], ...]}` per line
    (triples optional, T-REx style). A sentence states a triple when both its head and tail occur
    in it (distant supervision, as ERNIE 3.0's UKTP data); a line with a triple that no sentence
    states is counted and reported; a malformed line is an error naming file and line.

Entity spans come from a gazetteer of every head and tail in the graph (longest match first), so
knowledge masking hides people, cities, universities, employers, fields ... as whole units.

Batches: one task per micro-batch (`KnowledgeBatch`), the task drawn from `task_ratios` by
(seed, global batch index) so every rank trains the same task each step; examples are drawn
from (seed, batch index, rank). Items are whole micro-batches built on access; the knob
`progressive` (set by callbacks/progressive.py: global micro-batch index -> {'seq_len',
'batch_size'}) shapes each batch by its index, so prefetching and resuming see the same shapes.
The position in the epoch is checkpointed for an exact resume.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.jsonl import iter_jsonl, where
from datamodules.synthetic_bios import TEMPLATES, generate_biographies, person_facts, render_facts
from models.tokenizers.text import BPETokenizer, ByteTokenizer, TextTokenizer, load_tokenizer

__all__ = ["KnowledgeBatch", "KnowledgeCorpus", "KnowledgeDataModule", "KnowledgeFinetuneDataModule", "Sentence", "TASKS", "class_to_perm",
           "kmlm_mask", "load_jsonl_corpus", "perm_to_class"]

log = logging.getLogger(__name__)

TASKS = ("kmlm", "dlm", "reorder", "distance", "uktp")
SPECIALS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


# ----------------------------------------------------------------------------------------- corpus


@dataclass
class Sentence:
    """One sentence: its text, the triples it states (head and tail both in it), its template (-1 unknown)."""

    text: str
    triples: list[tuple[str, str, str]]
    template: int = -1
    relation: Optional[str] = None  # the fact it was written for (bios)
    fact: Optional[tuple[str, str, str]] = None  # that fact's triple, stated in full or not


@dataclass
class KnowledgeCorpus:
    docs: list[list[Sentence]]
    entities: list[str]
    unaligned_lines: int = 0
    relations: list[str] = field(default_factory=list)


def _entity_triples(triples: Sequence[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    by_head: dict[str, list] = {}
    for t in triples:
        by_head.setdefault(t[0], []).append(tuple(t))
    return by_head


def _stated(text: str, candidates: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [t for t in candidates if t[0] in text and t[2] in text]


def bios_corpus(num_people: int, seed: int, templates: Optional[Sequence[int]], render_seed: int) -> KnowledgeCorpus:
    """The biographies' people, one document each, written with the given templates."""
    bios = generate_biographies(num_people=num_people, seed=seed)
    by_name = {p["name"]: p for p in bios.people}
    by_head = _entity_triples([t for t in bios.triples if t[0] not in by_name])
    rng = random.Random(render_seed)
    docs = []
    for person in bios.people:
        sents = []
        for s in render_facts(rng, person, person_facts(person, by_name, bios.world), templates):
            # the fact's own triple, plus the graph's triples about the entities it names (city -> country ...)
            cands = [s["triple"]] + [t for v in s["slots"].values() if isinstance(v, str)
                                     for t in by_head.get(v.removeprefix("the "), [])]
            sents.append(Sentence(s["text"], _stated(s["text"], cands), s["template"], s["relation"], s["triple"]))
        docs.append(sents)
    entities = sorted({x for t in bios.triples for x in (t[0], t[2])})
    return KnowledgeCorpus(docs, entities, 0, sorted(TEMPLATES))


def load_jsonl_corpus(source: str | Path) -> KnowledgeCorpus:
    """Documents from .jsonl files (a file, a folder of them or a glob): sentences split on . ! ?"""
    path = Path(source)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else sorted(Path().glob(str(source))) if any(
        c in str(source) for c in "*?[") else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"data.source={source}: no .jsonl file found")
    docs, entities, relations, unaligned = [], set(), set(), 0
    for f in files:
        for lineno, row in iter_jsonl(f):
            try:
                text = row["text"]
                triples = [tuple(t) for t in row.get("triples") or []]
                if not isinstance(text, str) or any(len(t) != 3 or not all(isinstance(x, str) for x in t)
                                                    for t in triples):
                    raise ValueError("text must be a string and each triple three strings")
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where(f, lineno)}: malformed line ({e})") from e
            sents = [Sentence(s, _stated(s, triples)) for s in _SENT_SPLIT.split(text.strip()) if s]
            if any(not any(t in s.triples for s in sents) for t in triples):
                unaligned += 1
            docs.append(sents)
            entities.update(x for t in triples for x in (t[0], t[2]))
            relations.update(t[1] for t in triples)
    if unaligned:
        log.warning("%d line(s) state a triple that none of their sentences contains (head and tail together)",
                    unaligned)
    return KnowledgeCorpus(docs, sorted(entities), unaligned, sorted(relations))


# -------------------------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    """A tokenized sentence: ids, entity token spans [(start, end)), word-start flags."""

    ids: list[int]
    entities: list[tuple[int, int]]
    word_start: list[bool]


def _offsets(tok: TextTokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if isinstance(tok, BPETokenizer):
        enc = tok.hf_tokenizer.encode(text)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    ids, offs, pos = [], [], 0
    for ch in text:
        b = ch.encode("utf-8")
        ids.extend(b)
        offs.extend([(pos, pos + 1)] * len(b))
        pos += 1
    return ids, offs


def encode_sentence(tok: TextTokenizer, text: str, gazetteer: Optional[re.Pattern]) -> Encoded:
    """Tokenize " " + text (sentences are joined by spaces when concatenated), with its entity spans."""
    text = " " + text
    ids, offs = _offsets(tok, text)
    starts = [i == 0 or text[s] == " " or text[max(0, s - 1)] == " " for i, (s, e) in enumerate(offs)]
    spans = []
    if gazetteer is not None:
        for m in gazetteer.finditer(text):
            a, b = m.span()
            inside = [i for i, (s, e) in enumerate(offs) if e > a and s < b]
            if inside:
                spans.append((inside[0], inside[-1] + 1))
    return Encoded(ids, spans, starts)


def _gazetteer(entities: Sequence[str]) -> Optional[re.Pattern]:
    names = sorted({e for e in entities if len(e) >= 2}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"(?<![\w])(?:" + "|".join(re.escape(n) for n in names) + r")(?![\w])")


# ------------------------------------------------------------------------------ task builders


def kmlm_mask(ids: Sequence[int], entities: Sequence[tuple[int, int]], word_start: Sequence[bool], rng: random.Random,
              mask_id: int, vocab: int, ratio: float = 0.15, max_ngram: int = 3, protect: int = 0,
              ) -> tuple[list[int], list[int]]:
    """Knowledge masking: entity spans, phrase n-grams (n <= max_ngram, p ~ 1/n) and words are units,
    never split; units are drawn until ~ratio of the tokens are covered; each unit is replaced by
    [MASK] (80%), random tokens (10%) or kept (10%). Returns (inputs, targets with -100 elsewhere).

    protect: leading positions ([CLS]) never masked.
    """
    n = len(ids)
    unit_of = [-1] * n
    units: list[tuple[int, int]] = []
    for a, b in entities:
        if a >= protect and all(unit_of[i] == -1 for i in range(a, b)):
            for i in range(a, b):
                unit_of[i] = len(units)
            units.append((a, b))
    # words outside entities, then grouped into phrase n-grams of consecutive words
    words: list[tuple[int, int]] = []
    i = protect
    while i < n:
        if unit_of[i] != -1:
            i += 1
            continue
        j = i + 1
        while j < n and unit_of[j] == -1 and not word_start[j]:
            j += 1
        words.append((i, j))
        i = j
    k = 0
    weights = [1.0 / g for g in range(1, max_ngram + 1)]
    while k < len(words):
        g = rng.choices(range(1, max_ngram + 1), weights)[0]
        group = words[k:k + g]
        # a phrase joins adjacent words only
        while len(group) > 1 and any(group[x][1] != group[x + 1][0] for x in range(len(group) - 1)):
            group = group[:-1]
        units.append((group[0][0], group[-1][1]))
        k += len(group)
    order = list(range(len(units)))
    rng.shuffle(order)
    budget = max(1, round(ratio * (n - protect)))
    inputs, targets = list(ids), [-100] * n
    covered = 0
    for u in order:
        if covered >= budget:
            break
        a, b = units[u]
        if covered + (b - a) > budget * 1.5 and covered > 0:
            continue  # a long unit that would overshoot much: try a shorter one
        r = rng.random()
        for i in range(a, b):
            targets[i] = ids[i]
            if r < 0.8:
                inputs[i] = mask_id
            elif r < 0.9:
                inputs[i] = rng.randrange(vocab)
        covered += b - a
    return inputs, targets


def perm_to_class(perm: Sequence[int], max_segments: int) -> int:
    """Class of a shuffle of n segments: sum_{j<n} j! + rank of `perm` among the n! orders."""
    n = len(perm)
    if not 1 <= n <= max_segments:
        raise ValueError(f"{n} segments is outside [1, {max_segments}]")
    offset = sum(math.factorial(j) for j in range(1, n))
    return offset + list(permutations(range(n))).index(tuple(perm))


def class_to_perm(label: int, max_segments: int) -> tuple[int, ...]:
    for n in range(1, max_segments + 1):
        if label < math.factorial(n):
            return list(permutations(range(n)))[label]
        label -= math.factorial(n)
    raise ValueError("label out of range")


@dataclass
class KnowledgeBatch:
    """One task's micro-batch. tokens [B, T] (dlm: [B, S, T] segments in order); targets: token targets
    [B, T] / [B, S, T] with -100 where there is none, or class labels [B]; valid: real (non-pad) tokens."""

    task: str
    tokens: torch.Tensor
    targets: torch.Tensor
    valid: Optional[torch.Tensor] = None


# -------------------------------------------------------------------------------- datasets


class _BatchIndexSampler(Sampler):
    """Global batch indices epoch * n .. epoch * n + n - 1, skipping the first `skip` after a resume."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches, self.epoch, self.skip = num_batches, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(range(self.epoch * self.num_batches + skip, (self.epoch + 1) * self.num_batches))


class _Batches(Dataset):
    """Item i = this rank's part of global micro-batch i (built on access from the DataModule)."""

    def __init__(self, dm: "KnowledgeDataModule", split: str, fixed_tasks: Optional[list[str]] = None) -> None:
        self.dm, self.split, self.fixed_tasks = dm, split, fixed_tasks

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, index: int) -> KnowledgeBatch:
        task = self.fixed_tasks[index % len(self.fixed_tasks)] if self.fixed_tasks else self.dm.task_for(index)
        return self.dm.make_batch(task, index, self.split)


# ------------------------------------------------------------------------------ DataModule


class KnowledgeDataModule(L.LightningDataModule):
    """Knowledge-aligned pre-training batches for ERNIE 3.0 (see the module docstring).

    task_ratios: relative frequency of each task's micro-batches (0 switches a task off: the ablations).
    seq_len: tokens per NLU example and per document-LM segment; dlm_segments: segments per document.
    mask_ratio: knowledge-masking budget; knowledge_masking: False masks single words only (no entity or
    phrase units: the ablation); reorder_segments: m of sentence reordering.
    batch_size: global; batches_per_epoch: micro-batches in one training epoch.
    """

    def __init__(self, source: str = "bios", num_people: int = 2000, corpus_seed: int = 0, render_seed: int = 0,
                 train_templates: list[int] = [0, 1, 2],  # noqa: B006 (read only)
                 tokenizer: str = "bpe", vocab_size: int = 2048,
                 seq_len: int = 96, dlm_segments: int = 4, batch_size: int = 16, batches_per_epoch: int = 1000,
                 val_batches_per_task: int = 4, task_ratios: Optional[dict[str, float]] = None, mask_ratio: float = 0.15,
                 knowledge_masking: bool = True,
                 reorder_segments: int = 3, val_fraction: float = 0.05, split_seed: int = 0, seed: int = 0,
                 cache_dir: str = "data/cache", num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        ratios = {t: 1.0 for t in TASKS} if task_ratios is None else {**{t: 0.0 for t in TASKS}, **dict(task_ratios)}
        bad = sorted(set(ratios) - set(TASKS))
        if bad:
            raise ValueError(f"data.task_ratios has unknown tasks {bad}; tasks: {list(TASKS)}")
        if any(v < 0 for v in ratios.values()) or sum(ratios.values()) <= 0:
            raise ValueError(f"data.task_ratios must be >= 0 with a positive sum, got {ratios}")
        if tokenizer not in ("bpe", "byte"):
            raise ValueError(f"data.tokenizer must be 'bpe' or 'byte', got {tokenizer!r}")
        for key in ("seq_len", "dlm_segments", "batch_size", "batches_per_epoch", "val_batches_per_task",
                    "reorder_segments"):
            if getattr(self.hparams, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self.hparams, key)}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"data.mask_ratio must be in (0, 1), got {mask_ratio}")
        if any(not 0 <= t < 4 for t in train_templates):
            raise ValueError(f"data.train_templates must be template indices in [0, 3], got {list(train_templates)}")
        if num_workers:
            raise ValueError("data.num_workers must be 0: batches are built in the main process (cheap), where the "
                             "progressive-learning knob lives")
        self.task_ratios = ratios
        self.seq_len, self.batch_size = seq_len, batch_size
        # progressive-learning knob: global micro-batch index -> {'seq_len', 'batch_size'} (None = as configured)
        self.progressive: Optional[Callable[[int], dict]] = None
        self.tokenizer: Optional[TextTokenizer] = None
        self.corpus: Optional[KnowledgeCorpus] = None
        self._sampler: Optional[_BatchIndexSampler] = None
        self._pending: Optional[dict] = None

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Tokenizer vocabulary plus the special tokens [CLS] [SEP] [MASK] [PAD] appended after it."""
        return self.tokenizer.vocab_size + len(SPECIALS)

    def special(self, name: str) -> int:
        return self.tokenizer.vocab_size + SPECIALS.index(name)

    # -- building ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.corpus is not None:
            return
        hp = self.hparams
        if hp.source == "bios":
            corpus = bios_corpus(hp.num_people, hp.corpus_seed, list(hp.train_templates), hp.render_seed)
        else:
            corpus = load_jsonl_corpus(hp.source)
        if len(corpus.docs) < 4:
            raise ValueError(f"data.source={hp.source}: {len(corpus.docs)} documents; need at least 4")
        perm = list(range(len(corpus.docs)))
        random.Random(hp.split_seed).shuffle(perm)
        n_val = max(1, round(len(perm) * hp.val_fraction))
        self.val_docs, self.train_docs = sorted(perm[:n_val]), sorted(perm[n_val:])
        self.tokenizer = self._tokenizer(corpus)
        gaz = _gazetteer(corpus.entities)
        self.encoded = [[encode_sentence(self.tokenizer, s.text, gaz) for s in doc] for doc in corpus.docs]
        self.uktp_pairs = {split: [(d, i, t) for d in docs for i, s in enumerate(corpus.docs[d]) for t in s.triples]
                           for split, docs in (("train", self.train_docs), ("val", self.val_docs))}
        self.corpus = corpus
        self.gazetteer = gaz

    def _tokenizer(self, corpus: KnowledgeCorpus) -> TextTokenizer:
        hp = self.hparams
        if hp.tokenizer == "byte":
            return ByteTokenizer()
        texts = [s.text for d in self.train_docs for s in corpus.docs[d]]
        h = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:16]
        path = Path(hp.cache_dir) / f"tokenizer-knowledge-bpe-v{hp.vocab_size}-{h}.json"
        if path.is_file():
            try:
                tok = load_tokenizer(path)
                log.info("knowledge data: reusing the BPE tokenizer %s", path)
                return tok
            except ValueError as e:
                log.warning("ignoring unreadable tokenizer %s (%s); rebuilding", path, e)
        tok = BPETokenizer.train(texts, vocab_size=hp.vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
        log.info("knowledge data: trained a BPE tokenizer on the training sentences, cached at %s", path)
        return tok

    # -- batches ----------------------------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer if self._trainer_attached() else None
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def task_for(self, index: int) -> str:
        """The task of global micro-batch `index`: the same on every rank."""
        tasks = [t for t in TASKS if self.task_ratios[t] > 0]
        rng = random.Random(f"task:{self.hparams.seed}:{index}")
        return rng.choices(tasks, [self.task_ratios[t] for t in tasks])[0]

    def make_batch(self, task: str, index: int, split: str = "train") -> KnowledgeBatch:
        rank, world = self._rank_world()
        size, seq = self.batch_size, self.seq_len
        if split == "train" and self.progressive is not None:
            shape = self.progressive(index)
            size, seq = int(shape.get("batch_size", size)), int(shape.get("seq_len", seq))
        if size % world:
            raise ValueError(f"data.batch_size={size} is the global batch size and must be divisible by {world} processes")
        rng = random.Random(f"{split}:{self.hparams.seed}:{index}:{rank}")
        docs = self.train_docs if split == "train" else self.val_docs
        make = getattr(self, f"_{task}")
        examples = [make(rng, docs, seq, split) for _ in range(size // world)]
        if task == "dlm":
            return KnowledgeBatch(task, torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples]))
        if task in ("reorder", "distance"):
            return self._collate(task, [e[0] for e in examples], torch.tensor([e[1] for e in examples]))
        return self._collate(task, [e[0] for e in examples], None, [e[1] for e in examples])

    def _collate(self, task, inputs, labels=None, targets=None) -> KnowledgeBatch:
        T = max(len(x) for x in inputs)
        pad = self.special("[PAD]")
        tok = torch.full((len(inputs), T), pad, dtype=torch.long)
        valid = torch.zeros(len(inputs), T, dtype=torch.bool)
        tgt = torch.full((len(inputs), T), -100, dtype=torch.long) if targets is not None else None
        for b, x in enumerate(inputs):
            tok[b, :len(x)] = torch.tensor(x)
            valid[b, :len(x)] = True
            if tgt is not None:
                tgt[b, :len(x)] = torch.tensor(targets[b])
        return KnowledgeBatch(task, tok, labels if labels is not None else tgt, valid)

    def _paragraph(self, rng, docs, budget: int, min_sentences: int = 1):
        """(doc, first sentence, number of sentences) of consecutive sentences within `budget` tokens."""
        for _ in range(100):
            d = rng.choice(docs)
            enc = self.encoded[d]
            if len(enc) < min_sentences:
                continue
            i = rng.randrange(0, len(enc) - min_sentences + 1)
            n, used = 0, 0
            while i + n < len(enc) and used + len(enc[i + n].ids) + 1 <= budget:
                used += len(enc[i + n].ids) + 1
                n += 1
            if n >= min_sentences:
                return d, i, n
        if min_sentences == 1:
            return d, i, 1  # no sentence fits (short sequences early in progressive learning): truncated
        raise ValueError(f"no paragraph of {min_sentences} sentences fits data.seq_len={budget}: raise data.seq_len")

    def _kmlm(self, rng, docs, seq, split):
        d, i, n = self._paragraph(rng, docs, seq - 1)
        ids, ents, starts = [self.special("[CLS]")], [], [True]
        for e in self.encoded[d][i:i + n]:
            off = len(ids)
            ids += e.ids
            ents += [(a + off, b + off) for a, b in e.entities]
            starts += e.word_start
        ids, starts = ids[:seq], starts[:seq]
        ents = [(a, b) for a, b in ents if b <= seq]
        knowledge = self.hparams.knowledge_masking
        return kmlm_mask(ids, ents if knowledge else [], starts, rng, self.special("[MASK]"), self.tokenizer.vocab_size,
                         self.hparams.mask_ratio, max_ngram=3 if knowledge else 1, protect=1)

    def _dlm(self, rng, docs, seq, split):
        """A long document: one person's sentences, other documents as filler, then a restatement of
        some of the first person's facts (needs what was said segments earlier)."""
        S = self.hparams.dlm_segments
        need = S * seq + 1
        d0 = rng.choice(docs)
        stream = [i for e in self.encoded[d0] for i in e.ids] + [self.tokenizer.eos_id]
        recall = []
        if self.corpus.docs[d0][0].relation is not None:  # bios: restate two facts by full name, late
            name = self.corpus.docs[d0][0].triples[0][0] if self.corpus.docs[d0][0].triples else None
            for s in rng.sample(self.corpus.docs[d0], min(2, len(self.corpus.docs[d0]))):
                if name and s.triples and s.triples[0][0] == name:
                    recall += self.tokenizer.encode(f" Recall: {name}'s {s.relation.replace('_', ' ')} is "
                                                    f"{s.triples[0][2]}.")
        while len(stream) + len(recall) < need:
            d = rng.choice(docs)
            stream += [i for e in self.encoded[d] for i in e.ids] + [self.tokenizer.eos_id]
        stream = (stream[: need - len(recall)] + recall)[:need]
        x = torch.tensor(stream)
        return x[:-1].view(S, seq), x[1:].view(S, seq)

    def _reorder(self, rng, docs, seq, split):
        m = self.hparams.reorder_segments
        n = rng.randint(1, m)
        while True:  # fewer segments when n sentences do not fit (short sequences)
            try:
                d, i, k = self._paragraph(rng, docs, seq - 1 - n, min_sentences=n)
                break
            except ValueError:
                if n == 1:
                    raise
                n -= 1
        cuts = sorted(rng.sample(range(1, k), n - 1)) if n > 1 else []
        bounds = [0] + cuts + [k]
        segs = [[t for e in self.encoded[d][i + bounds[j]:i + bounds[j + 1]] for t in e.ids] for j in range(n)]
        perm = list(range(n))
        rng.shuffle(perm)
        ids = [self.special("[CLS]")]
        for j in perm:
            ids += segs[j] + [self.special("[SEP]")]
        return ids[:seq], perm_to_class(perm, m)

    def _distance(self, rng, docs, seq, split):
        label = rng.randrange(3)
        for _ in range(100):
            d = rng.choice(docs)
            enc = self.encoded[d]
            if label == 0 and len(enc) >= 2:
                i = rng.randrange(len(enc) - 1)
                a, b = enc[i], enc[i + 1]
            elif label == 1 and len(enc) >= 3:
                i, j = sorted(rng.sample(range(len(enc)), 2))
                if j - i < 2:
                    continue
                a, b = enc[i], enc[j]
            elif label == 2:
                d2 = rng.choice(docs)
                if d2 == d:
                    continue
                a, b = rng.choice(enc), rng.choice(self.encoded[d2])
            else:
                continue
            if rng.random() < 0.5 and label != 0:
                a, b = b, a
            half = (seq - 3) // 2
            ids = [self.special("[CLS]")] + a.ids[:half] + [self.special("[SEP]")] + b.ids[:half] + [self.special("[SEP]")]
            return ids, label
        raise ValueError("the corpus has too few multi-sentence documents for sentence distance")

    def _uktp(self, rng, docs, seq, split):
        pairs = self.uktp_pairs[split]
        if not pairs:
            raise ValueError("no sentence states a triple (head and tail together): UKTP needs aligned triples; "
                             "set data.task_ratios.uktp=0")
        d, i, (h, r, t) = rng.choice(pairs)
        cls, sep, mask = self.special("[CLS]"), self.special("[SEP]"), self.special("[MASK]")
        hi, ri, ti = (self.tokenizer.encode(x) for x in (h, r.replace("_", " "), t))
        sent = self.encoded[d][i]
        prefix = [cls] + hi + [sep]
        if rng.random() < 0.5:  # mask the relation: the model must find head and tail in the sentence
            ids = prefix + [mask] * len(ri) + [sep] + ti + [sep] + sent.ids + [sep]
            tgt = [-100] * len(prefix) + ri + [-100] * (len(ids) - len(prefix) - len(ri))
        else:  # mask words of the sentence: the triple helps to fill them
            head = prefix + ri + [sep] + ti + [sep]
            s_in, s_tgt = kmlm_mask(sent.ids, [], sent.word_start, rng, mask, self.tokenizer.vocab_size,
                                    self.hparams.mask_ratio, max_ngram=1)
            ids, tgt = head + s_in + [sep], [-100] * len(head) + s_tgt + [-100]
        return ids[:seq], tgt[:seq]

    # -- loaders ----------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        self.setup()
        self._sampler = _BatchIndexSampler(self.hparams.batches_per_epoch)
        if self._pending is not None:
            self._sampler.epoch, self._sampler.skip = self._pending["epoch"], self._pending["consumed"]
            self._pending = None
        return DataLoader(_Batches(self, "train"), batch_size=None, sampler=self._sampler, collate_fn=lambda b: b)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        tasks = [t for t in TASKS if self.task_ratios[t] > 0]
        n = self.hparams.val_batches_per_task * len(tasks)
        return DataLoader(_Batches(self, "val", tasks), batch_size=None, sampler=range(n), collate_fn=lambda b: b)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        if not self._trainer_attached():
            return {}
        ready = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        epoch = self.trainer.current_epoch
        if ready >= self.hparams.batches_per_epoch:
            epoch, ready = epoch + 1, 0
        return {"epoch": epoch, "consumed": ready}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" in state:
            self._pending = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"])}
            if self._sampler is not None:
                self._sampler.epoch, self._sampler.skip = self._pending["epoch"], self._pending["consumed"]
                self._pending = None

    # -- evaluation sets --------------------------------------------------------------------------

    def relation_examples(self, split: str, templates: Optional[Sequence[int]] = None) -> list[tuple[list[int], str]]:
        """Relation classification: `[CLS] sentence [SEP] head [SEP] tail [SEP]` -> the relation, for
        sentences that name both entities of their fact (of `split`'s people; bios: written with
        `templates`, default the training ones, re-rendered when held out)."""
        docs = self._docs_with_templates(split, templates)
        cls, sep = self.special("[CLS]"), self.special("[SEP]")
        out = []
        for doc in docs:
            for s in doc:
                for h, r, t in s.triples[:1]:
                    ids = [cls] + self.tokenizer.encode(s.text) + [sep] + self.tokenizer.encode(h) + [sep] \
                        + self.tokenizer.encode(t) + [sep]
                    out.append((ids[: self.seq_len], r))
        return out

    def _docs_with_templates(self, split: str, templates: Optional[Sequence[int]]) -> list[list[Sentence]]:
        ids = self.train_docs if split == "train" else self.val_docs
        if templates is None or self.hparams.source != "bios":
            return [self.corpus.docs[d] for d in ids]
        other = bios_corpus(self.hparams.num_people, self.hparams.corpus_seed, list(templates),
                            self.hparams.render_seed + 1)
        return [other.docs[d] for d in ids]

    def cloze_probes(self, split: str = "train", templates: Sequence[int] = (3,), max_probes: int = 200,
                     seed: int = 0) -> list[dict]:
        """Fact probes: a sentence (by default in the held-out template) whose fact's tail is to be
        filled in, with every tail of that relation as candidates: {'text', 'start', 'end', 'answer',
        'candidates', 'relation'} (character span of the answer in text)."""
        docs = self._docs_with_templates(split, templates)
        tails: dict[str, set] = {}
        for doc in self.corpus.docs:
            for s in doc:
                if s.fact is not None:
                    tails.setdefault(s.fact[1], set()).add(s.fact[2])
        probes = []
        for doc in docs:
            for s in doc:
                if s.fact is None or s.relation == "birth_date":
                    continue
                h, r, t = s.fact
                if t not in s.text:
                    continue
                a = s.text.index(t)
                probes.append({"text": s.text, "start": a, "end": a + len(t), "answer": t, "relation": r,
                               "candidates": sorted(tails[r])})
        random.Random(seed).shuffle(probes)
        return probes[:max_probes]


# ------------------------------------------------------------------------------ fine-tuning


class KnowledgeFinetuneDataModule(KnowledgeDataModule):
    """Sentence-level classification sets from the same knowledge corpus (and tokenizer) as pre-training.

    task 'relation': `[CLS] sentence [SEP] head [SEP] tail [SEP]` -> the relation; trained on the
        training people's sentences, evaluated on held-out people, each fact once in every wording
        of `eval_templates` (so [0, 1, 2, 3] gives four times the test sentences of [3]).
    task 'verify': `[CLS] sentence [SEP]` -> whether the stated fact is true (the tail swapped for
        another of the same relation when false); trained and evaluated on the training people (facts
        the pre-training saw), evaluated once in every `eval_templates` wording (default: the held-out one).
    k_shot: training examples per class (None = all).
    """

    FINETUNE_TASKS = ("relation", "verify")

    def __init__(self, task: str = "relation", k_shot: Optional[int] = None, eval_templates: list[int] = [3],  # noqa: B006 (read only)
                 max_eval: int = 512, **kwargs) -> None:
        super().__init__(**kwargs)
        if task not in self.FINETUNE_TASKS:
            raise ValueError(f"data.task must be one of {list(self.FINETUNE_TASKS)}, got {task!r}")
        if k_shot is not None and k_shot < 1:
            raise ValueError(f"data.k_shot must be >= 1 or null, got {k_shot}")
        self.task, self.k_shot, self.eval_templates, self.max_eval = task, k_shot, list(eval_templates), max_eval
        self.train_set: Optional[list] = None

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if self.train_set is not None:
            return
        rng = random.Random(f"finetune:{self.hparams.seed}")
        # bios: every evaluated fact once in each of eval_templates (real data has one wording)
        wordings = [[t] for t in self.eval_templates] if self.hparams.source == "bios" else [None]
        if self.task == "relation":
            train = self.relation_examples("train")
            evals = [ex for w in wordings for ex in self.relation_examples("val", w)]
        else:
            train = self._verify_examples(self._docs_with_templates("train", None), rng)
            evals = self._verify_examples([d for w in wordings for d in self._docs_with_templates("train", w)], rng)
        self.labels = sorted({y for _, y in train})
        index = {y: i for i, y in enumerate(self.labels)}
        rng.shuffle(train)
        if self.k_shot is not None:
            per_class: dict = {}
            kept = []
            for example in train:
                per_class[example[1]] = per_class.get(example[1], 0) + 1
                if per_class[example[1]] <= self.k_shot:
                    kept.append(example)
            train = kept
        rng.shuffle(evals)
        self.train_set = [(x, index[y]) for x, y in train]
        self.eval_set = [(x, index[y]) for x, y in evals if y in index][: self.max_eval]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _verify_examples(self, docs, rng) -> list[tuple[list[int], int]]:
        tails: dict[str, list] = {}
        for doc in self.corpus.docs:
            for s in doc:
                if s.triples:
                    tails.setdefault(s.triples[0][1], []).append(s.triples[0][2])
        cls, sep = self.special("[CLS]"), self.special("[SEP]")
        out = []
        for doc in docs:
            for s in doc:
                if not s.triples or s.triples[0][2] not in s.text:
                    continue
                h, r, t = s.triples[0]
                text, label = s.text, 1
                if rng.random() < 0.5:
                    other = rng.choice([x for x in set(tails[r]) if x != t] or [t])
                    text, label = s.text.replace(t, other), int(other == t)
                out.append(([cls] + self.tokenizer.encode(text)[: self.seq_len - 2] + [sep], label))
        return out

    def _loader(self, data: list, shuffle: bool) -> DataLoader:
        _, world = self._rank_world()
        per_rank = max(1, self.batch_size // world)

        def collate(items):
            return self._collate("classify", [x for x, _ in items], torch.tensor([y for _, y in items]))

        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(data, batch_size=per_rank, shuffle=shuffle, generator=g if shuffle else None,
                          collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.eval_set, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return {}
