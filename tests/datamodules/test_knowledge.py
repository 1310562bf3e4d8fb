"""The knowledge DataModule: aligned sentences, knowledge masking, the five task builders, real JSONL data."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from datamodules.knowledge import (KnowledgeDataModule, KnowledgeFinetuneDataModule, class_to_perm, kmlm_mask,
                                   load_jsonl_corpus, perm_to_class)


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> KnowledgeDataModule:
    d = KnowledgeDataModule(num_people=60, tokenizer="byte", seq_len=160, batch_size=8,
                            cache_dir=str(tmp_path_factory.mktemp("kc")))
    d.setup()
    return d


def test_sentences_state_their_triples_and_held_out_templates_stay_out(dm):
    for doc in dm.corpus.docs:
        for s in doc:
            assert s.template in (0, 1, 2)  # template 3 is held out of pre-training text
            for h, r, t in s.triples:
                assert h in s.text and t in s.text
    first = dm.corpus.docs[0][0]
    assert first.triples and first.triples[0][0] in first.text  # the opening sentence names the person
    probes = dm.cloze_probes("train", (3,), max_probes=50)
    assert probes and all(p["answer"] in p["candidates"] and p["text"][p["start"]:p["end"]] == p["answer"]
                          for p in probes)


def test_knowledge_masking_never_splits_an_entity_and_keeps_the_ratio(dm):
    rng = random.Random(0)
    total, masked = 0, 0
    mask = dm.special("[MASK]")
    for _ in range(200):
        ids, tgt = dm._kmlm(rng, dm.train_docs, 160, "train")
        assert ids[0] == dm.special("[CLS]") and tgt[0] == -100
        total += len(ids) - 1
        masked += sum(t != -100 for t in tgt)
        for i, (x, t) in enumerate(zip(ids, tgt)):
            if t != -100 and x not in (mask, t):
                assert 0 <= x < dm.tokenizer.vocab_size  # a random replacement, never a special token
    assert 0.13 < masked / total < 0.19
    # entity spans are units: hand-built spans are masked all together or not at all
    rng = random.Random(1)
    ids = list(range(10, 50))
    ents = [(2, 7), (10, 14), (20, 29)]
    starts = [True] * 40
    for _ in range(300):
        _, tgt = kmlm_mask(ids, ents, starts, rng, 0, 100, ratio=0.3)
        for a, b in ents:
            hit = [tgt[i] != -100 for i in range(a, b)]
            assert all(hit) or not any(hit)
    # corruption: 80% [MASK], 10% random, 10% kept, per unit
    rng = random.Random(2)
    kinds = Counter()
    for _ in range(2000):
        inp, tgt = kmlm_mask([5] * 20, [], [True] * 20, rng, 0, 100, ratio=0.05)
        i = next(i for i, t in enumerate(tgt) if t != -100)
        kinds["mask" if inp[i] == 0 else "keep" if inp[i] == 5 else "random"] += 1
    assert kinds["mask"] / 2000 == pytest.approx(0.8, abs=0.03)
    assert kinds["random"] / 2000 == pytest.approx(0.1 * 99 / 100, abs=0.03)


def test_reordering_labels_invert_the_permutation(dm):
    for m in (1, 2, 3, 4):
        labels = set()
        from itertools import permutations

        for n in range(1, m + 1):
            for perm in permutations(range(n)):
                c = perm_to_class(perm, m)
                assert class_to_perm(c, m) == perm
                labels.add(c)
        assert labels == set(range(sum(__import__("math").factorial(n) for n in range(1, m + 1))))
    rng = random.Random(0)
    sep, cls = dm.special("[SEP]"), dm.special("[CLS]")
    for _ in range(100):
        ids, label = dm._reorder(rng, dm.train_docs, 160, "train")
        assert ids[0] == cls and ids[-1] == sep
        parts, cur = [], []
        for x in ids[1:]:
            if x == sep:
                parts.append(cur)
                cur = []
            else:
                cur.append(x)
        perm = class_to_perm(label, 3)
        assert len(parts) == len(perm)
        original = [None] * len(perm)
        for pos, seg in zip(perm, parts):
            original[pos] = seg
        text = dm.tokenizer.decode([x for seg in original for x in seg])
        # undoing the permutation restores consecutive sentences of one document
        assert any(text.strip() in " ".join(s.text for s in doc) for doc in dm.corpus.docs)


def test_sentence_distance_labels(dm):
    where: dict = {}  # a sentence's ids -> every (doc, index) it occurs at (short sentences repeat)
    for d, enc in enumerate(dm.encoded):
        for i, e in enumerate(enc):
            where.setdefault(tuple(e.ids), []).append((d, i))
    rng = random.Random(0)
    seen = Counter()
    sep = dm.special("[SEP]")
    for _ in range(300):
        ids, label = dm._distance(rng, dm.train_docs, 400, "train")
        a = ids[1:ids.index(sep)]
        b = ids[ids.index(sep) + 1:-1]
        pairs = [(da, ia, db, ib) for da, ia in where[tuple(a)] for db, ib in where[tuple(b)]]
        if label == 0:
            assert any(da == db and ib == ia + 1 for da, ia, db, ib in pairs)
        elif label == 1:
            assert any(da == db and abs(ia - ib) >= 2 for da, ia, db, ib in pairs)
        else:
            assert any(da != db for da, ia, db, ib in pairs)
        seen[label] += 1
    assert set(seen) == {0, 1, 2}


def test_uktp_input_and_masks_for_a_hand_built_triple(tmp_path):
    src = tmp_path / "kg.jsonl"
    lines = [{"text": "Ada Byron was born in London. She liked numbers.", "triples": [["Ada Byron", "birth city", "London"]]},
             {"text": "Alan Turing studied at Cambridge. He ran far.", "triples": [["Alan Turing", "university", "Cambridge"]]},
             {"text": "Grace Hopper served in the navy. She wrote compilers.", "triples": []},
             {"text": "Tim Lee lives in Geneva.", "triples": [["Tim Lee", "employer", "CERN"]]}]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    d = KnowledgeDataModule(source=str(src), tokenizer="byte", seq_len=200, batch_size=2, val_fraction=0.25,
                            split_seed=3, cache_dir=str(tmp_path / "c"))
    d.setup()
    assert d.corpus.unaligned_lines == 1  # CERN never occurs in its text
    cls, sep, mask = (d.special(n) for n in ("[CLS]", "[SEP]", "[MASK]"))
    enc = d.tokenizer.encode
    rng = random.Random(0)
    kinds = set()
    for _ in range(40):
        ids, tgt = d._uktp(rng, d.train_docs, 200, "train")
        head = ids[1:ids.index(sep)]
        h, r, t = next(tr for doc in d.corpus.docs for s in doc for tr in s.triples if enc(tr[0]) == head)
        n_h, n_r, n_t = len(enc(h)), len(enc(r)), len(enc(t))
        rel = slice(2 + n_h, 2 + n_h + n_r)
        assert ids[0] == cls and ids[1 + n_h] == sep and ids[rel.stop] == sep and ids[-1] == sep
        if all(x == mask for x in ids[rel]):  # relation masked: exactly its tokens are the targets
            assert tgt[rel] == enc(r) and sum(x != -100 for x in tgt) == n_r
            kinds.add("relation")
        else:  # sentence words masked: the triple is visible and untouched
            assert ids[rel] == enc(r) and ids[rel.stop + 1:rel.stop + 1 + n_t] == enc(t)
            assert all(x == -100 for x in tgt[: rel.stop + 2 + n_t]) and any(x != -100 for x in tgt)
            kinds.add("sentence")
    assert kinds == {"relation", "sentence"}


def test_malformed_jsonl_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine."}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed line"):
        load_jsonl_corpus(bad)
    bad.write_text('{"text": "fine.", "triples": [["a", "b"]]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_jsonl_corpus(bad)
    with pytest.raises(FileNotFoundError, match="no .jsonl file"):
        load_jsonl_corpus(tmp_path / "missing")


def test_batches_one_task_per_micro_batch_same_task_on_every_rank(dm):
    tasks = [dm.task_for(i) for i in range(500)]
    assert set(tasks) == set(("kmlm", "dlm", "reorder", "distance", "uktp"))
    assert Counter(tasks)["uktp"] == pytest.approx(100, abs=30)
    b = dm.make_batch("dlm", 3)
    assert b.tokens.shape == (8, 4, 160) and torch.equal(b.tokens.flatten(1)[:, 1:], b.targets.flatten(1)[:, :-1])
    b = dm.make_batch("reorder", 4)
    assert b.targets.shape == (8,) and b.valid.any(1).all()
    ablated = KnowledgeDataModule(num_people=60, tokenizer="byte", task_ratios={"kmlm": 1, "dlm": 1}, cache_dir=dm.hparams.cache_dir)
    assert {ablated.task_for(i) for i in range(100)} == {"kmlm", "dlm"}
    with pytest.raises(ValueError, match="data.task_ratios has unknown tasks"):
        KnowledgeDataModule(task_ratios={"nsp": 1})
    dm.progressive = lambda index: {"seq_len": 32, "batch_size": 4}
    try:
        b = dm.make_batch("kmlm", 7)
        assert b.tokens.shape[0] == 4 and b.tokens.shape[1] <= 32
        assert dm.make_batch("kmlm", 7, "val").tokens.shape[0] == 8  # validation keeps its shape
    finally:
        dm.progressive = None


def test_finetune_sets(tmp_path):
    kw = dict(num_people=60, tokenizer="byte", seq_len=160, batch_size=8, cache_dir=str(tmp_path))
    rel = KnowledgeFinetuneDataModule(task="relation", k_shot=3, **kw)
    rel.setup()
    counts = Counter(y for _, y in rel.train_set)
    assert max(counts.values()) <= 3 and rel.num_classes >= 8 and rel.eval_set
    ver = KnowledgeFinetuneDataModule(task="verify", **kw)
    ver.setup()
    assert ver.num_classes == 2 and 0.3 < sum(y for _, y in ver.eval_set) / len(ver.eval_set) < 0.7
    batch = next(iter(ver.train_dataloader()))
    assert batch.tokens.shape[0] == 8 and batch.targets.shape == (8,)


def test_finetune_eval_templates_give_every_fact_once_per_wording(tmp_path):
    kw = dict(num_people=60, tokenizer="byte", seq_len=160, batch_size=8, cache_dir=str(tmp_path), max_eval=10_000)
    one = KnowledgeFinetuneDataModule(task="relation", eval_templates=[3], **kw)
    one.setup()
    four = KnowledgeFinetuneDataModule(task="relation", eval_templates=[0, 1, 2, 3], **kw)
    four.setup()
    assert len(four.eval_set) == 4 * len(one.eval_set) > 0
    assert all(ex in four.eval_set for ex in one.eval_set)  # wording 3's sentences are among them
    # the labels (relations) are the same multiset, four times
    assert Counter(y for _, y in four.eval_set) == Counter({y: 4 * n for y, n in Counter(y for _, y in one.eval_set).items()})
