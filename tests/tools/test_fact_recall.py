"""Fact recall: the pure scorer on hand-made probes, the probes of the biography corpus and its
held-out templates, the FactRecall callback in a tiny run, and tools/fact_recall.py on its checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

import train
from datamodules.synthetic_bios import TEMPLATES, fact_cloze_probes, generate_biographies
from datamodules.text import TextDataModule
from models.fact_recall import candidate_scores, cloze_parts, exact_match, fact_recall, rank_of, recall_metrics
from models.tokenizers import build_tokenizer
from tests.helpers import find_metrics, read_metric

TOK = build_tokenizer("byte")


def _probe(text: str, answer: str, candidates: list[str], relation: str, seen: bool = True) -> dict:
    start = text.index(answer)
    return {"text": text, "start": start, "end": start + len(answer), "answer": answer, "candidates": candidates,
            "relation": relation, "seen": seen}


PROBES = [
    _probe("Ada Lind was born in Rome.", "Rome", ["Lima", "Oslo", "Rome"], "birth_city"),
    _probe("Ada Lind works for Acme Labs.", "Acme Labs", ["Acme Bank", "Acme Labs"], "employer"),
    _probe("Bo Varg's field of study was law.", "law", ["art", "law", "music", "physics"], "field", seen=False),
]


class Continuer(torch.nn.Module):
    """Next-token logits that spell out `target(probe)` after each probe's prompt, then EOS."""

    def __init__(self, probes, target):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device for the scorer to find
        self.seqs = []
        for p in probes:
            left, cands, _ = cloze_parts(p)
            cont = cands[p["candidates"].index(target(p))]
            self.seqs.append([TOK.eos_id] + TOK.encode(left) + TOK.encode(cont) + [TOK.eos_id])

    def forward(self, x):
        out = torch.zeros(*x.shape, TOK.vocab_size)
        for b, row in enumerate(x.tolist()):
            for t in range(len(row)):
                for seq in self.seqs:
                    if t + 1 < len(seq) and seq[: t + 1] == row[: t + 1]:
                        out[b, t, seq[t + 1]] = 10.0
                        break
        return out


def test_a_model_that_continues_with_the_answer_scores_one_and_a_wrong_one_zero():
    right = fact_recall(Continuer(PROBES, lambda p: p["answer"]), TOK, PROBES, max_new_tokens=12)
    assert right["exact"] == right["top1"] == right["mrr"] == 1.0
    assert right["seen"]["probes"] == 2 and right["unseen"]["probes"] == 1
    assert right["per_relation"]["employer"] == {"probes": 1, "top1": 1.0, "mrr": 1.0, "exact": 1.0}
    assert [r["continuation"] for r in right["records"]] == [" Rome", " Acme Labs", " law"]  # then EOS

    wrong = fact_recall(Continuer(PROBES, lambda p: next(c for c in p["candidates"] if c != p["answer"])), TOK,
                        PROBES, max_new_tokens=12)
    assert wrong["exact"] == 0.0 and wrong["top1"] == 0.0 and wrong["seen"]["exact"] == wrong["unseen"]["exact"] == 0
    # too few new tokens to spell "Acme Labs" out: no exact match even for the right model
    short = fact_recall(Continuer(PROBES, lambda p: p["answer"]), TOK, PROBES, max_new_tokens=4)
    assert short["per_relation"]["employer"]["exact"] == 0.0 and short["per_relation"]["field"]["exact"] == 1.0


class Unigram(torch.nn.Module):
    """The same next-token distribution everywhere: candidate log-probabilities are sums of table entries."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)


def test_rank_and_scores_match_a_hand_computation():
    assert rank_of([-1.0, -0.5, -2.0], 0) == 2 and rank_of([-1.0, -0.5, -2.0], 1) == 1
    assert rank_of([-1.0, -1.0, -1.0], 1) == 3  # ties count against the answer
    m = recall_metrics([{"relation": "a", "rank": 1, "num_candidates": 2, "exact": True},
                        {"relation": "a", "rank": 2, "num_candidates": 4, "exact": False},
                        {"relation": "b", "rank": 4, "num_candidates": 4, "exact": False}])
    assert m["top1"] == pytest.approx(1 / 3) and m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert m["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3) and m["exact"] == pytest.approx(1 / 3)
    assert m["per_relation"]["a"] == {"probes": 2, "top1": 0.5, "mrr": 0.75, "exact": 0.5}

    logits = torch.full((TOK.vocab_size,), -5.0)
    for ch, v in {" ": 2.0, "a": 1.0, "l": 0.5, "w": 0.0, "m": -1.0}.items():
        logits[TOK.encode(ch)[0]] = v
    lp = logits.log_softmax(-1)
    model = Unigram(logits)
    probe = PROBES[2]  # candidates art, law, music, physics after "... was"
    for score, reduce in (("sum", sum), ("mean", lambda v: sum(v) / len(v))):
        got = candidate_scores(model, TOK, [probe], score=score)[0]
        want = [reduce([float(lp[i]) for i in TOK.encode(" " + c)]) for c in probe["candidates"]]
        assert got == pytest.approx(want, abs=1e-5)
    want_mean = [sum(float(lp[i]) for i in TOK.encode(" " + c)) / (len(c) + 1) for c in probe["candidates"]]
    expected_rank = 1 + sum(s >= want_mean[1] for j, s in enumerate(want_mean) if j != 1)
    out = fact_recall(model, TOK, [probe], max_new_tokens=3)
    assert out["records"][0]["rank"] == expected_rank and out["mrr"] == pytest.approx(1 / expected_rank)
    assert out["records"][0]["continuation"] == "   " and out["exact"] == 0.0  # the unigram's argmax is " "


def test_exact_match_needs_a_word_boundary():
    assert exact_match(" Rome, Italy", ["Rome"]) and exact_match("Rome", ["Rome"])
    assert not exact_match(" Romeo", ["Rome"]) and exact_match(" sailing.", ["chess", "sailing"])


def test_corpus_probes_name_the_subject_before_the_object_and_rank_filtered():
    bios = generate_biographies(num_people=60, seed=0)
    probes = fact_cloze_probes(bios, range(60), None, None, seed=0, max_candidates=8)
    assert {p["relation"] for p in probes} == set(TEMPLATES)
    for p in probes:
        prompt = p["text"][: p["start"]]
        assert p["subject"] in prompt and p["text"][p["start"]: p["end"]] == p["answer"]
        assert p["answer"] in p["candidates"] and len(p["candidates"]) <= 8
        assert not set(p["candidates"]) & (set(p["answers"]) - {p["answer"]})  # other true objects left out
    # object-first templates cannot be continued: parent / sibling template 3 never appears
    assert not any(p["relation"] in ("parent", "sibling") and p["template"] == 3 for p in probes)
    again = fact_cloze_probes(bios, range(60), None, 25, seed=0, max_candidates=8)
    assert again == probes[:25] and fact_cloze_probes(bios, range(60), None, 25, seed=1, max_candidates=8) != again


def test_held_out_templates_never_reach_the_training_text(tmp_path):
    dm = TextDataModule(num_people=50, tokenizer="byte", train_templates=[0, 1, 2], cache_dir=str(tmp_path))
    probes = dm.fact_probes("train", 10, seed=0, max_candidates=4)  # before setup: the corpus is rebuilt
    dm.setup()
    assert dm.fact_probes("train", 10, seed=0, max_candidates=4) == probes
    text = "\n".join(dm.iter_train_documents())
    # birth_date's template 3 ("Records show that ...") is in the default corpus, never in this one
    assert "Records show that" not in "\n".join(dm.bios.documents) and "came into the world" in text
    assert "Records show that" in "\n".join(generate_biographies(num_people=50, seed=0).documents)
    seen = [p for p in probes if p["seen"]]
    unseen = [p for p in probes if not p["seen"]]
    assert len(seen) == len(unseen) == 10
    assert {p["template"] for p in seen} <= {0, 1, 2} and {p["template"] for p in unseen} == {3}
    assert all(p["text"] not in text for p in unseen if p["relation"] == "birth_date")
    with pytest.raises(ValueError, match="data.train_templates"):
        TextDataModule(train_templates=[0, 4])
    with pytest.raises(ValueError, match="data.train_templates applies to data.source=bios"):
        TextDataModule(source=str(tmp_path), train_templates=[0])
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        dm.fact_probes("test")


RUN = ["+callbacks/fact_recall=default", "callbacks.fact_recall.max_probes=3", "callbacks.fact_recall.max_candidates=4",
       "callbacks.fact_recall.max_new_tokens=4", "data.train_templates=[0,1,2]", "trainer.max_steps=2",
       "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv", "test=false"]


def test_callback_logs_recall_and_the_tool_reproduces_it_from_the_checkpoint(make_cfg, tmp_path, capsys):
    cfg = make_cfg(RUN)
    metrics, objects = train.run(cfg)
    csv = find_metrics(tmp_path / "run")
    logged = {name: read_metric(csv, name) for name in ("val/fact_recall", "val/fact_recall_mrr",
                                                         "val/fact_recall_top1", "val/fact_recall_unseen",
                                                         "val/fact_recall_unseen_mrr", "val/fact_recall_chance")}
    for name, values in logged.items():
        assert len(values) == 1, name  # once, at the one validation (not in the sanity check)
        assert 0.0 <= list(values.values())[0] <= 1.0
    assert list(logged["val/fact_recall_chance"].values())[0] == pytest.approx(0.25)
    assert list(read_metric(csv, "val/fact_recall_probes").values()) == [3]  # max_probes per wording group
    count = objects["datamodule"].fact_count("train")
    assert list(read_metric(csv, "val/fact_count").values()) == [count]
    assert list(read_metric(csv, "val/facts_known").values())[0] == pytest.approx(
        list(logged["val/fact_recall"].values())[0] * count)
    assert any(k.startswith("val/fact_recall/") for k in metrics)
    callback = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "FactRecall")
    assert len(callback.probes) == 6 and callback.last["seen"]["probes"] == 3

    from tools.fact_recall import main as tool_main

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tool_main([str(ckpt), "--max-probes", "3", "--max-candidates", "4", "--max-new-tokens", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["train_templates"] == [0, 1, 2] and out["probes"] == 6
    # the same probes and weights as the callback's validation at the last step: the same numbers
    assert out["seen"]["mrr"] == pytest.approx(list(logged["val/fact_recall_mrr"].values())[0], abs=1e-6)
    assert out["unseen"]["exact"] == pytest.approx(list(logged["val/fact_recall_unseen"].values())[0])
    assert out["fact_count"] == count and out["facts_known"] == pytest.approx(out["seen"]["exact"] * count)
    val = tool_main([str(ckpt), "--split", "val", "--max-probes", "2", "--max-candidates", "4",
                     "--max-new-tokens", "2"])
    assert val["split"] == "val" and val["probes"] == 4 and math.isclose(val["chance"], 0.25)
    with pytest.raises(SystemExit):
        tool_main([str(ckpt), "--max-candidates", "1"])


def test_tool_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from models.io import UnsafeCheckpointError
    from tests.test_safe_load import hostile_lm_checkpoint
    from tools.fact_recall import main as tool_main

    marker = tmp_path / "MARKER"
    path = hostile_lm_checkpoint(tmp_path / "hostile.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="hostile.ckpt"):
        tool_main([str(path)])
    assert not marker.exists()
