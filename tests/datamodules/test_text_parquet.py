"""Parquet text sources: a "text" column read in record batches; bad files are errors naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import datamodules.text as text  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from datamodules.text import load_documents  # noqa: E402

DOCS = [f"Document number {i} says {'hello ' * (i % 5 + 1)}world." for i in range(23)]


def write_parquet(path: Path, columns: dict, row_group_size: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_text_column_is_read_in_batches(tmp_path, monkeypatch):
    rows = DOCS[:10] + [None, "   "] + DOCS[10:]  # null and blank values are not documents
    path = write_parquet(tmp_path / "corpus.parquet", {"id": list(range(len(rows))), "text": rows})

    def whole_file(*args, **kwargs):
        raise AssertionError("a Parquet file must not be read whole")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    real_iter = pq.ParquetFile.iter_batches
    batches = []

    def counting_iter(self, *args, **kwargs):
        for batch in real_iter(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting_iter)
    monkeypatch.setattr(text, "_PARQUET_BATCH_ROWS", 4)
    assert load_documents(str(path)) == DOCS
    assert len(batches) > 1 and max(batches) <= 4 and sum(batches) == len(rows)


def test_parquet_in_a_folder_with_other_sources_and_the_datamodule(tmp_path):
    root = tmp_path / "data"
    write_parquet(root / "a.parquet", {"text": DOCS[:12]})
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[12:]) + "\n")
    assert load_documents(str(root)) == DOCS  # sorted file order: a.parquet, b.jsonl
    dm = TextDataModule(source=str(root), tokenizer="byte", seq_len=16, batch_size=2, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.tokens.shape == (2, 16)
    assert sorted(dm.train_doc_ids + dm.val_doc_ids) == list(range(len(DOCS)))


def test_parquet_without_a_text_column_is_an_error_naming_it(tmp_path):
    path = write_parquet(tmp_path / "no_text.parquet", {"body": DOCS})
    with pytest.raises(ValueError) as err:
        load_documents(str(path))
    assert str(path) in str(err.value) and "'text'" in str(err.value) and "body" in str(err.value)
    numbers = write_parquet(tmp_path / "numbers.parquet", {"text": list(range(5))})
    with pytest.raises(ValueError, match="numbers.parquet.*expected strings"):
        load_documents(str(numbers))
    empty = write_parquet(tmp_path / "empty.parquet", {"text": ["", None]})
    with pytest.raises(ValueError, match="empty.parquet contains no non-empty 'text'"):
        load_documents(str(empty))


@pytest.mark.parametrize("case", ["garbage", "truncated", "empty"])
def test_unreadable_parquet_file_is_an_error_naming_it(tmp_path, case):
    good = write_parquet(tmp_path / "good.parquet", {"text": DOCS}).read_bytes()
    data = {"garbage": b"this is not a parquet file\n" * 20, "truncated": good[: len(good) // 2],
            "empty": b""}[case]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data)
    with pytest.raises(ValueError) as err:
        load_documents(str(bad))
    assert str(bad) in str(err.value)


def test_corrupt_parquet_data_pages_are_an_error_naming_the_file(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", {"text": DOCS * 50}, row_group_size=200)
    raw = bytearray(path.read_bytes())
    # overwrite the middle of the data pages, keeping the footer (schema) readable
    mid = len(raw) // 3
    raw[mid : mid + 400] = b"\xff" * 400
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unreadable Parquet data") as err:
        load_documents(str(path))
    assert str(path) in str(err.value)
