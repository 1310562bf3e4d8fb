import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
import warnings

import pytest
import torch

from datamodules import LMBatch, TextDataModule
from datamodules.synthetic_bios import generate_biographies
from datamodules.text import load_documents, pack_documents, split_documents
from models.tokenizers import BPETokenizer
from tests.helpers import resume_trainer

SMALL = dict(num_people=120, vocab_size=400, seq_len=32, batch_size=4)


def make_dm(cache_dir, **overrides) -> TextDataModule:
    return TextDataModule(cache_dir=str(cache_dir), **{**SMALL, **overrides})


def built(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def fake_trainer(world_size=1, rank=0, epoch=0, ready=0, num_training_batches=float("inf")):
    progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        current_epoch=epoch,
        num_training_batches=num_training_batches,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


@pytest.fixture(scope="module")
def bios_docs() -> list[str]:
    return generate_biographies(num_people=SMALL["num_people"], seed=0).documents


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> TextDataModule:
    return built(make_dm(tmp_path_factory.mktemp("cache")))


# ---------------------------------------------------------------------------
# building, packing, splitting
# ---------------------------------------------------------------------------


def test_standalone_setup_gives_tokenizer_and_lm_batches(dm):
    assert dm.trainer is None
    assert isinstance(dm.tokenizer, BPETokenizer) and dm.tokenizer.vocab_size <= SMALL["vocab_size"]
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, LMBatch)
    assert batch.tokens.shape == batch.targets.shape == (4, 32)
    assert batch.tokens.dtype == batch.targets.dtype == torch.int64
    assert torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1])
    val = next(iter(dm.val_dataloader()))
    assert val.tokens.shape[1] == 32
    assert len(dm.test_dataloader().dataset) == len(dm.val_dataset)


def test_packing_windows_eos_and_counts(dm, bios_docs):
    seq = SMALL["seq_len"]
    for ids, dataset in ((dm.train_doc_ids, dm.train_dataset), (dm.val_doc_ids, dm.val_dataset)):
        docs = [bios_docs[i] for i in ids]
        stream = torch.as_tensor(pack_documents(docs, dm.tokenizer).astype("int64"))
        assert len(dataset) == stream.numel() // (seq + 1)
        windows = []
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["tokens"].shape == item["targets"].shape == (seq,)
            assert torch.equal(item["tokens"][1:], item["targets"][:-1])
            windows.append(torch.cat([item["tokens"], item["targets"][-1:]]))
        # Non-overlapping windows tile the stream; only the short tail is dropped.
        assert torch.equal(torch.cat(windows), stream[: len(dataset) * (seq + 1)])
        # One EOS after every document, and the pieces between EOS decode to the documents.
        eos_positions = (stream == dm.tokenizer.eos_id).nonzero().flatten().tolist()
        assert len(eos_positions) == len(docs) and eos_positions[-1] == stream.numel() - 1
        starts = [0] + [p + 1 for p in eos_positions[:-1]]
        decoded = [dm.tokenizer.decode(stream[a:b].tolist()) for a, b in zip(starts, eos_positions)]
        assert decoded == docs


def test_split_is_deterministic_disjoint_and_complete(dm):
    train, val = split_documents(100, 0.1, split_seed=0)
    assert (train, val) == split_documents(100, 0.1, split_seed=0)
    assert split_documents(100, 0.1, split_seed=1) != (train, val)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert not set(dm.train_doc_ids) & set(dm.val_doc_ids)
    assert sorted(dm.train_doc_ids + dm.val_doc_ids) == list(range(SMALL["num_people"]))
    assert len(dm.val_doc_ids) == round(0.05 * SMALL["num_people"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(10, 1.0, 0)


def test_tokenizer_is_trained_on_train_documents_only(dm, bios_docs):
    train_docs = [bios_docs[i] for i in dm.train_doc_ids]
    expected = BPETokenizer.train(train_docs, vocab_size=SMALL["vocab_size"])
    assert dm.tokenizer.fingerprint() == expected.fingerprint()


def test_byte_tokenizer_datamodule(tmp_path):
    d = built(make_dm(tmp_path, tokenizer="byte"))
    assert d.tokenizer_path is None and d.tokenizer.vocab_size == 258 and d.tokenizer.eos_id == 256
    assert d.cache_info["tokenizer"] == "none"
    assert len(d.train_dataset) > 0


def test_invalid_settings():
    with pytest.raises(ValueError, match="tokenizer"):
        TextDataModule(tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(seq_len=0)


# ---------------------------------------------------------------------------
# caching
# ---------------------------------------------------------------------------


def cache_mtimes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}


def test_second_setup_reuses_tokenizer_and_token_caches(tmp_path):
    cache = tmp_path / "cache"
    first = built(make_dm(cache))
    assert first.cache_info == {"tokenizer": "trained", "train_tokens": "built", "val_tokens": "built"}
    before = cache_mtimes(cache)
    assert len(before) == 3 and not [n for n in before if n.endswith(".tmp")]

    second = built(make_dm(cache))
    assert second.cache_info == {"tokenizer": "loaded", "train_tokens": "loaded", "val_tokens": "loaded"}
    assert cache_mtimes(cache) == before
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert torch.equal(second.train_dataset.windows, first.train_dataset.windows)


def test_cache_is_rebuilt_when_settings_or_corpus_change(tmp_path):
    cache = tmp_path / "cache"
    base = built(make_dm(cache))
    for overrides in ({"vocab_size": 450}, {"num_people": 130}, {"corpus_seed": 1}):
        changed = built(make_dm(cache, **overrides))
        assert changed.cache_info["tokenizer"] == "trained", overrides
        assert changed.tokenizer_path != base.tokenizer_path
        assert changed.tokenizer.fingerprint() != base.tokenizer.fingerprint()
    # seq_len only changes how the cached stream is cut: nothing is rebuilt.
    recut = built(make_dm(cache, seq_len=16))
    assert set(recut.cache_info.values()) == {"loaded"}
    assert recut.train_dataset.windows.shape[1] == 17


def test_corrupt_token_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    built(make_dm(cache, tokenizer="byte"))
    for p in cache.glob("tokens-train-*.npy"):
        p.write_bytes(b"garbage")
    again = built(make_dm(cache, tokenizer="byte"))
    assert again.cache_info["train_tokens"] == "built"


# ---------------------------------------------------------------------------
# distributed sharding and batch size
# ---------------------------------------------------------------------------


def test_global_batch_size_must_divide_by_world_size(tmp_path):
    d = make_dm(tmp_path, tokenizer="byte", batch_size=4)
    d.trainer = fake_trainer(world_size=3)
    with pytest.raises(ValueError, match=r"data\.batch_size.*3"):
        d.setup("fit")


def test_ranks_get_disjoint_train_shards_and_per_rank_batches(tmp_path):
    loaders = []
    for rank in range(2):
        d = make_dm(tmp_path, tokenizer="byte", batch_size=4)
        d.trainer = fake_trainer(world_size=2, rank=rank)
        d.prepare_data()
        d.setup("fit")
        loaders.append((d.train_dataloader(), d.val_dataloader()))
    shards = []
    for train, val in loaders:
        assert train.batch_size == 2
        order = list(train.sampler)
        shards.append(set(order))
        first = next(iter(train))
        assert torch.equal(first.tokens, train.dataset.windows[order[:2], :-1])
        assert len(val.sampler) == -(-len(val.dataset) // 2)
    # Compared by index: the templated corpus does contain some identical windows.
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 2 * (len(loaders[0][0].dataset) // 2)


# ---------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------


def batches(loader) -> list[list[list[int]]]:
    return [b.tokens[:, :4].tolist() for b in loader]


def test_state_dict_without_trainer_is_empty(dm):
    assert dm.state_dict() == {}


def test_state_dict_from_progress_and_resume(tmp_path):
    cache = tmp_path / "cache"
    d = built(make_dm(cache, tokenizer="byte"))
    loader = d.train_dataloader()
    loader.sampler.set_epoch(1)
    uninterrupted = batches(loader)

    d.trainer = fake_trainer(epoch=1, ready=3, num_training_batches=len(uninterrupted))
    state = d.state_dict()
    assert state["sampler"] == {"epoch": 1, "consumed": 3 * 4}

    # State restored before the loader exists (Lightning's order) ...
    resumed = built(make_dm(cache, tokenizer="byte"))
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)
    assert batches(loader) == uninterrupted[3:]
    loader.sampler.set_epoch(2)
    assert len(batches(loader)) == len(uninterrupted)

    # ... or after it exists.
    late = built(make_dm(cache, tokenizer="byte"))
    loader = late.train_dataloader()
    late.load_state_dict(state)
    loader.sampler.set_epoch(1)
    assert batches(loader) == uninterrupted[3:]


def test_finished_epoch_is_saved_as_start_of_next(tmp_path):
    d = built(make_dm(tmp_path, tokenizer="byte"))
    d.trainer = fake_trainer(epoch=2, ready=10, num_training_batches=10)
    assert d.state_dict()["sampler"] == {"epoch": 3, "consumed": 0}


class _Recorder:
    """Tiny LightningModule factory that records every training batch it sees."""

    @staticmethod
    def make():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(1, 1)
                self.seen = []

            def training_step(self, batch, batch_idx):
                self.seen.append((self.current_epoch, batch.tokens[:, :3].tolist()))
                return self.layer(batch.tokens[:, :1].float()).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


@pytest.mark.parametrize("checkpoint_at,num_workers", [("mid_epoch", 0), ("epoch_end", 2)])
def test_lightning_resume_replays_exactly_the_remaining_batches(tmp_path, checkpoint_at, num_workers):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cache = tmp_path / "cache"

    def data():
        return TextDataModule(num_people=30, tokenizer="byte", seq_len=64, batch_size=16,
                              cache_dir=str(cache), num_workers=num_workers)

    trainer = resume_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _Recorder.make()
        trainer(max_epochs=3).fit(reference, datamodule=data())
        per_epoch = len(reference.seen) // 3
        assert per_epoch >= 4

        if checkpoint_at == "mid_epoch":
            step = per_epoch + 2  # inside the second epoch
            callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1)
            first = trainer(max_steps=step + 1, callbacks=[callback])
        else:
            step = per_epoch
            callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                       save_on_train_epoch_end=True)
            first = trainer(max_epochs=1, callbacks=[callback])
        first.fit(_Recorder.make(), datamodule=data())
        (ckpt,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))

        resumed = _Recorder.make()
        trainer(max_epochs=3).fit(resumed, datamodule=data(), ckpt_path=str(ckpt))
    assert resumed.seen == reference.seen[step:]


# ---------------------------------------------------------------------------
# real files
# ---------------------------------------------------------------------------


def write_corpus(root: Path, docs: list[str]) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0] + "\n\n" + docs[1] + "\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text(docs[2], encoding="utf-8")
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[3:])]
    (root / "c.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")
    (root / "notes.md").write_text("ignored: not .txt/.jsonl")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("")


def test_real_folder_of_txt_and_jsonl(tmp_path, bios_docs):
    root = tmp_path / "corpus"
    docs = bios_docs[:60]
    write_corpus(root, docs)
    # Sorted by path: a.txt (two paragraphs), c.jsonl, sub/b.txt; notes.md and hidden dirs are skipped.
    assert load_documents(str(root)) == docs[:2] + docs[3:] + [docs[2]]
    assert load_documents(str(root / "*.txt")) == docs[:2]
    assert load_documents(str(root / "a.txt"), txt_split="file") == [docs[0] + "\n\n" + docs[1]]

    cache = tmp_path / "cache"
    d = built(TextDataModule(source=str(root), tokenizer="bpe", vocab_size=300, seq_len=32, batch_size=4,
                             val_fraction=0.1, cache_dir=str(cache)))
    assert d.bios is None and len(d.train_doc_ids) + len(d.val_doc_ids) == 60
    batch = next(iter(d.train_dataloader()))
    assert batch.tokens.shape == (4, 32)

    # Editing a file changes the corpus hash: the tokenizer must not be silently reused.
    (root / "sub" / "b.txt").write_text(docs[2] + " Extra sentence appended later.", encoding="utf-8")
    again = built(TextDataModule(source=str(root), tokenizer="bpe", vocab_size=300, seq_len=32, batch_size=4,
                                 val_fraction=0.1, cache_dir=str(cache)))
    assert again.cache_info["train_tokens"] == "built"
    b_txt = len(docs) - 1
    if b_txt in again.train_doc_ids:
        assert again.cache_info["tokenizer"] == "trained"
        assert again.tokenizer_path != d.tokenizer_path
    else:  # the tokenizer depends on train documents only
        assert again.cache_info["tokenizer"] == "loaded"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\n ", "empty"),
        ("binary.txt", b"abc\x00\x01def", "binary"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "UTF-8"),
        ("badline.jsonl", b'{"text": "ok"}\n{not json\n', r"badline\.jsonl:2"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext\.jsonl:2.*text"),
        ("nonstr.jsonl", b'{"text": 5}\n', r"nonstr\.jsonl:1"),
        ("array.jsonl", b'["text"]\n', r"array\.jsonl:1"),
    ],
)
def test_bad_files_raise_with_the_file_name(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_documents(str(path))
    assert str(path) in str(info.value)
    # The same error surfaces through the DataModule, and also when the file sits in a folder.
    with pytest.raises(ValueError, match=match):
        TextDataModule(source=str(tmp_path), cache_dir=str(tmp_path / "cache")).prepare_data()


def test_unreadable_file_raises_with_its_name(tmp_path):
    link = tmp_path / "gone.txt"
    os.symlink(tmp_path / "does-not-exist", link)
    with pytest.raises(ValueError, match="gone.txt"):
        load_documents(str(tmp_path))


def test_missing_sources_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.txt"):
        load_documents(str(tmp_path / "nothing-*.txt"))
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        load_documents(str(tmp_path / "no-such-file.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        load_documents(str(tmp_path / "empty_dir"))


def test_augmented_biographies_split_by_person_and_probe_people(tmp_path, dm):
    aug = built(make_dm(tmp_path, bio_renderings=3, bio_full_names=True))
    n = SMALL["num_people"]
    assert len(aug.train_doc_ids) + len(aug.val_doc_ids) == 3 * n
    train_people = {aug.bios.person_of(i) for i in aug.train_doc_ids}
    val_people = {aug.bios.person_of(i) for i in aug.val_doc_ids}
    assert not train_people & val_people and len(train_people) + len(val_people) == n
    # the same people as the one-rendering corpus puts on each side, every rendering with them
    assert train_people == set(dm.train_doc_ids) and len(aug.train_doc_ids) == 3 * len(dm.train_doc_ids)
    probes = aug.fact_probes("train", max_probes=40)
    names = {aug.bios.people[p]["name"] for p in train_people}
    assert probes and all(p["subject"] in names for p in probes)
    assert all(p["subject"] not in names for p in aug.fact_probes("val", max_probes=40))
    assert aug.hparams.bio_renderings == 3 and aug.hparams.bio_full_names is True
    # the facts a recall rate is a fraction of: the knowledge graph's triples about the split's people,
    # counted once however many biographies state them
    for split, people in (("train", train_people), ("val", val_people)):
        names = {aug.bios.people[p]["name"] for p in people}
        assert aug.fact_count(split) == sum(s in names for s, _, _ in aug.bios.triples) == dm.fact_count(split)
    assert aug.fact_count("train") > 5 * len(train_people)  # every person has at least six facts
    with pytest.raises(ValueError, match="data.bio_renderings must be an integer >= 1"):
        make_dm(tmp_path, bio_renderings=0)
    with pytest.raises(ValueError, match="data.bio_renderings / data.bio_full_names apply to data.source=bios"):
        make_dm(tmp_path, source=str(tmp_path / "x.txt"), bio_full_names=True)
