"""Packed next-token-prediction data from the synthetic biographies or from real text files."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import glob
import hashlib
import logging
import os
from pathlib import Path
import random
import re

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import collate_lm
from datamodules.resumable import ResumableDataModule
from datamodules.sampler import ResumableSampler
from datamodules.jsonl import iter_jsonl, where
from datamodules.synthetic_bios import (BiographyCorpus, check_templates, fact_cloze_probes, generate_biographies,
                                        person_facts)
from models.io import atomic_write
from models.tokenizers import TextTokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "PackedDataset",
    "TextDataModule",
    "build_corpus",
    "corpus_hash",
    "load_documents",
    "pack_documents",
    "split_documents",
]

log = logging.getLogger(__name__)

# Bump when the packing or caching format changes so stale caches are never reused.
_CACHE_VERSION = 1
_TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_PARQUET_BATCH_ROWS = 1024  # rows read per record batch: a Parquet file is never read whole


# ---------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read data file {path}: {e.strerror or e}") from e
    if not data.strip():
        raise ValueError(f"data file {path} is empty")
    if b"\x00" in data:
        raise ValueError(f"data file {path} looks binary (contains NUL bytes)")
    try:
        # utf-8-sig drops a leading BOM that editors on some platforms add.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not valid UTF-8 (bad byte at offset {e.start})") from e


def _read_txt(path: Path, txt_split: str) -> list[str]:
    text = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
    if txt_split == "file":
        docs = [text.strip()]
    else:
        # Paragraphs as documents lets a single big file (a book) still get a document-level val split.
        docs = [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"data file {path} contains no text")
    return docs


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{where(path, lineno)}: expected a JSON object with a string 'text' field")
        if record["text"].strip():
            docs.append(record["text"])
    if not docs:
        raise ValueError(f"data file {path} contains no non-empty 'text' records")
    return docs


def _read_parquet(path: Path, column: str = "text", batch_rows: int | None = None) -> list[str]:
    """Non-empty strings of the `column` column, read `batch_rows` rows at a time (pyarrow)."""
    batch_rows = batch_rows or _PARQUET_BATCH_ROWS
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading the Parquet data file {path} needs pyarrow: pip install pyarrow") from e
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"data file {path} is not a readable Parquet file ({e})") from e
    with parquet:
        schema = parquet.schema_arrow
        if column not in schema.names:
            raise ValueError(f"data file {path} has no {column!r} column "
                             f"(columns: {', '.join(schema.names) or 'none'})")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise ValueError(f"data file {path}: column {column!r} holds {kind}, expected strings")
        docs = []
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
                docs.extend(t for t in batch.column(0).to_pylist() if t is not None and t.strip())
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"data file {path}: unreadable Parquet data ({e})") from e
    if not docs:
        raise ValueError(f"data file {path} contains no non-empty {column!r} values")
    return docs


def _read_documents(path: Path, txt_split: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_txt(path, txt_split)


def _resolve_files(source: str) -> list[Path]:
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        files = [Path(m) for m in sorted(glob.glob(expanded, recursive=True)) if not os.path.isdir(m)]
        if not files:
            raise FileNotFoundError(f"data source glob {source!r} matched no files")
        return files
    path = Path(expanded)
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*")
            if f.suffix.lower() in _TEXT_SUFFIXES
            and not f.is_dir()
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"no .txt, .jsonl or .parquet files under data source directory {path}")
        return files
    if path.exists() or path.is_symlink():
        return [path]
    raise FileNotFoundError(
        f"data source {source!r} does not exist (expected 'bios', a file, a directory or a glob)"
    )


def load_documents(source: str, txt_split: str = "paragraph") -> list[str]:
    """Documents from a file, a directory (its .txt/.jsonl/.parquet files, recursively) or a glob.

    `.jsonl`: one document per line's "text" field. `.parquet`: one document per non-empty value
    of its "text" column, read in record batches (pyarrow). Other files are plain UTF-8 text,
    split into documents at blank lines (`txt_split="paragraph"`) or kept whole (`"file"`).
    """
    if txt_split not in ("paragraph", "file"):
        raise ValueError(f"txt_split must be 'paragraph' or 'file', got {txt_split!r}")
    docs: list[str] = []
    for path in _resolve_files(source):
        docs.extend(_read_documents(path, txt_split))
    return docs


def build_corpus(
    source: str = "bios",
    num_people: int = 2000,
    corpus_seed: int = 0,
    txt_split: str = "paragraph",
    train_templates: Sequence[int] | None = None,
    bio_renderings: int = 1,
    bio_full_names: bool = False,
) -> tuple[list[str], BiographyCorpus | None]:
    """Documents for `source`, plus the BiographyCorpus (with fact triples) when source is "bios".

    train_templates: the biographies are written with these sentence templates only (None: all four).
    bio_renderings / bio_full_names: biographies per person and full names in every sentence
    (`synthetic_bios.generate_biographies`' renderings / full_names).
    """
    if source == "bios":
        bios = generate_biographies(num_people=num_people, seed=corpus_seed, templates=train_templates,
                                    renderings=bio_renderings, full_names=bio_full_names)
        return list(bios.documents), bios
    return load_documents(source, txt_split=txt_split), None


def corpus_hash(documents: Sequence[str]) -> str:
    """Content hash of an ordered list of documents (document boundaries included)."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        # Length prefix: ["ab", "c"] and ["a", "bc"] must hash differently.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def split_bios(bios: BiographyCorpus, val_fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    """(train, val) document ids of a biography corpus, split by person: every rendering of a person
    falls on the same side. With one rendering per person, exactly `split_documents`."""
    train_people, val_people = split_documents(len(bios.people), val_fraction, split_seed)
    n = len(bios.people)
    expand = lambda ids: [r * n + p for r in range(bios.renderings) for p in ids]  # noqa: E731
    return expand(train_people), expand(val_people)


def split_documents(num_docs: int, val_fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    """Seeded document-level split into sorted (train, val) index lists."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = 0 if val_fraction == 0 else max(1, round(num_docs * val_fraction))
    if num_docs - num_val < 1:
        raise ValueError(f"need at least 2 documents for a train/val split, got {num_docs}")
    perm = list(range(num_docs))
    random.Random(split_seed).shuffle(perm)
    return sorted(perm[num_val:]), sorted(perm[:num_val])


def pack_documents(documents: Sequence[str], tokenizer: TextTokenizer, chunk: int = 1024) -> np.ndarray:
    """One token stream: each document's ids followed by EOS, concatenated."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts = []
    for start in range(0, len(documents), chunk):
        for ids in tokenizer.encode_batch(list(documents[start : start + chunk])):
            parts.append(np.asarray(ids, dtype=dtype))
            parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class PackedDataset(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens cut from one stream; the short tail is dropped."""

    def __init__(self, stream: torch.Tensor | np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        # int32 storage halves memory versus int64; windows are widened per item.
        stream = torch.as_tensor(np.ascontiguousarray(np.asarray(stream).reshape(-1), dtype=np.int32))
        self.seq_len = seq_len
        self.num_windows = stream.numel() // (seq_len + 1)
        self.windows = stream[: self.num_windows * (seq_len + 1)].view(self.num_windows, seq_len + 1)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        window = self.windows[idx].long()
        return {"tokens": window[:-1], "targets": window[1:]}


# ---------------------------------------------------------------------------
# Atomic cache helpers
# ---------------------------------------------------------------------------


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def _load_npy(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable token cache %s (%s); rebuilding", path, e)
        return None
    return arr if arr.ndim == 1 else None


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------


class TextDataModule(ResumableDataModule):
    """Tokenized, packed LM data with cached tokenizer/streams and exactly resumable training order.

    `source` is "bios" (generated corpus) or a file, directory or glob of .txt/.jsonl/.parquet
    files (a .parquet file: its "text" column). `batch_size` is global; each rank loads `batch_size // world_size`.
    `train_templates` (bios only): the sentence templates (0-3 of each relation's four) the biographies
    are written with; the others never appear in the text, so fact probes in them test recall in an
    unseen wording (`fact_probes`). None (default): all four, the historical corpus.
    `bio_renderings` / `bio_full_names` (bios only): knowledge augmentation, several biographies per
    person (each its own sentence order, templates and references) and the full name in every
    sentence; the train / validation split is then by person, every rendering on one side.
    """

    def __init__(
        self,
        source: str = "bios",
        num_people: int = 2000,
        corpus_seed: int = 0,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str = "data/cache",
        pin_memory: bool = False,
        txt_split: str = "paragraph",
        train_templates: list[int] | None = None,
        bio_renderings: int = 1,
        bio_full_names: bool = False,
    ) -> None:
        super().__init__()
        # Stored in checkpoints (datamodule_hyper_parameters): tools that continue a run reuse the data.
        self.save_hyperparameters()
        if tokenizer not in ("bpe", "byte"):
            raise ValueError(f"data.tokenizer must be 'bpe' or 'byte', got {tokenizer!r}")
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if txt_split not in ("paragraph", "file"):
            raise ValueError(f"data.txt_split must be 'paragraph' or 'file', got {txt_split!r}")
        if train_templates is not None and str(source) != "bios":
            raise ValueError(f"data.train_templates applies to data.source=bios only, got data.source={source!r}")
        self.train_templates = check_templates(train_templates, "data.train_templates")
        if isinstance(bio_renderings, bool) or not isinstance(bio_renderings, int) or bio_renderings < 1:
            raise ValueError(f"data.bio_renderings must be an integer >= 1, got {bio_renderings!r}")
        if (bio_renderings != 1 or bio_full_names) and str(source) != "bios":
            raise ValueError(f"data.bio_renderings / data.bio_full_names apply to data.source=bios only, "
                             f"got data.source={source!r}")
        self.bio_renderings, self.bio_full_names = bio_renderings, bool(bio_full_names)
        self.source = str(source)
        self.num_people = num_people
        self.corpus_seed = corpus_seed
        self.tokenizer_kind = tokenizer
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir)
        self.pin_memory = pin_memory
        self.txt_split = txt_split

        self.tokenizer: TextTokenizer | None = None
        self.tokenizer_path: Path | None = None
        self.train_dataset: PackedDataset | None = None
        self.val_dataset: PackedDataset | None = None
        self.bios: BiographyCorpus | None = None
        self.train_doc_ids: list[int] = []
        self.val_doc_ids: list[int] = []
        self.corpus_hash: str | None = None
        # What the last build did ("trained"/"loaded"/...), so callers and tests can see cache hits.
        self.cache_info: dict[str, str] = {}
        self._train_sampler: ResumableSampler | None = None
        self._pending_sampler_state: dict | None = None

    # -- distributed context -------------------------------------------------


    # -- building ------------------------------------------------------------

    def _corpus(self) -> tuple[list[str], BiographyCorpus | None]:
        return build_corpus(self.source, self.num_people, self.corpus_seed, self.txt_split, self.train_templates,
                            self.bio_renderings, self.bio_full_names)

    def _split(self, docs: list[str], bios: BiographyCorpus | None) -> tuple[list[int], list[int]]:
        if bios is not None:
            return split_bios(bios, self.val_fraction, self.split_seed)
        return split_documents(len(docs), self.val_fraction, self.split_seed)

    def _build(self) -> None:
        """Load or build tokenizer and token streams; idempotent and deterministic on every rank."""
        docs, bios = self._corpus()
        train_ids, val_ids = self._split(docs, bios)
        train_docs = [docs[i] for i in train_ids]
        val_docs = [docs[i] for i in val_ids]
        full_hash = corpus_hash(docs)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        info: dict[str, str] = {}

        if self.tokenizer_kind == "byte":
            tokenizer: TextTokenizer = build_tokenizer("byte")
            self.tokenizer_path = None
            info["tokenizer"] = "none"
        else:
            # Keyed by the TRAIN documents only: the tokenizer never sees val text,
            # and any change of corpus, split or settings gets a fresh file.
            key = _digest("bpe", corpus_hash(train_docs), self.vocab_size, _CACHE_VERSION)
            path = self.cache_dir / f"tokenizer-bpe-v{self.vocab_size}-{key}.json"
            tokenizer = None
            if path.is_file():
                try:
                    tokenizer = load_tokenizer(path)
                    info["tokenizer"] = "loaded"
                except ValueError as e:
                    log.warning("ignoring unreadable tokenizer cache %s (%s); retraining", path, e)
            if tokenizer is None:
                log.info("training BPE tokenizer (vocab_size=%d) on %d documents",
                         self.vocab_size, len(train_docs))
                tokenizer = build_tokenizer("bpe", texts=train_docs, vocab_size=self.vocab_size)
                tokenizer.save(path)
                info["tokenizer"] = "trained"
            self.tokenizer_path = path

        streams = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            key = _digest(full_hash, tokenizer.fingerprint(), self.split_seed, self.val_fraction,
                          self.txt_split, split, _CACHE_VERSION)
            path = self.cache_dir / f"tokens-{split}-{key}.npy"
            stream = _load_npy(path)
            if stream is None:
                stream = pack_documents(split_docs, tokenizer)
                _atomic_save_npy(path, stream)
                info[f"{split}_tokens"] = "built"
            else:
                info[f"{split}_tokens"] = "loaded"
            streams[split] = stream

        self.tokenizer = tokenizer
        self.bios = bios
        self.train_doc_ids, self.val_doc_ids = train_ids, val_ids
        self.corpus_hash = full_hash
        self.cache_info = info
        self.train_dataset = PackedDataset(streams["train"], self.seq_len)
        self.val_dataset = PackedDataset(streams["val"], self.seq_len)
        if len(self.val_dataset) == 0 and val_docs:
            log.warning("val split has %d tokens, fewer than one window of %d: validation will be empty",
                        streams["val"].size, self.seq_len + 1)
        if len(self.train_dataset) == 0:
            raise ValueError(
                f"train split of {self.source!r} has {streams['train'].size} tokens, "
                f"too few for one window of data.seq_len + 1 = {self.seq_len + 1}"
            )

    def prepare_data(self) -> None:
        """Build the tokenizer and token caches (Lightning runs this on one process per node)."""
        # Already built in this process (e.g. a standalone setup before fit): the caches
        # exist and the tokenizer object the model holds must stay the same.
        if self.train_dataset is None:
            self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load the caches (rebuilding them if missing) and check the batch size against the world size."""
        self.per_rank_batch_size()
        if self.train_dataset is None:
            self._build()

    # -- loaders ---------------------------------------------------------------

    def _require_setup(self) -> None:
        if self.train_dataset is None or self.val_dataset is None:
            raise RuntimeError("TextDataModule.setup() must run before requesting dataloaders")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, rank-sharded, exactly resumable loader with the per-rank batch size."""
        self._require_setup()
        sampler = self._make_train_sampler(
            len(self.train_dataset),
            f"train split has {len(self.train_dataset)} windows, fewer than one global batch "
            f"(data.batch_size={self.batch_size}); lower data.batch_size or data.seq_len",
        )
        return self._loader(self.train_dataset, sampler, self.per_rank_batch_size(), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Sequential loader over this rank's shard of the val split."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """Same as validation: the corpus has no separate test split."""
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        self._require_setup()
        sampler = self._make_eval_sampler(len(self.val_dataset))
        return self._loader(self.val_dataset, sampler, self.per_rank_batch_size(), drop_last=False)

    def _loader(
        self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=collate_lm,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def iter_train_documents(self) -> Iterator[str]:
        """Raw train documents (e.g. for probes); regenerates or rereads the corpus."""
        docs, _ = self._corpus()
        for i in self.train_doc_ids:
            yield docs[i]

    def _split_people(self, split: str) -> tuple[BiographyCorpus, list[int]]:
        """The corpus and the people (indices into bios.people) of `split` ('train' or 'val')."""
        if split not in ("train", "val"):
            raise ValueError(f"fact probe split must be 'train' or 'val', got {split!r}")
        if self.source != "bios":
            raise ValueError(f"fact probes need the biography corpus (data.source=bios), "
                             f"got data.source={self.source!r}")
        bios = self.bios
        train_ids, val_ids = self.train_doc_ids, self.val_doc_ids
        if bios is None:
            docs, bios = self._corpus()
            train_ids, val_ids = self._split(docs, bios)
        ids = train_ids if split == "train" else val_ids
        people = ids[: len(ids) // bios.renderings]  # the first rendering's documents: one per person
        if not people:
            raise ValueError(f"the {split} split holds no biographies (data.val_fraction={self.val_fraction})")
        return bios, people

    def fact_count(self, split: str = "train") -> int:
        """How many facts the biographies of `split`'s people state (each (person, relation, object) once,
        whatever the renderings): the number a recall rate is a fraction of."""
        bios, people = self._split_people(split)
        by_name = {p["name"]: p for p in bios.people}
        return sum(len(person_facts(bios.people[i], by_name, bios.world)) for i in people)

    def fact_probes(self, split: str = "train", max_probes: int | None = 200, seed: int = 0,
                    max_candidates: int | None = 32) -> list[dict]:
        """Cloze probes of the biographies' facts (`synthetic_bios.fact_cloze_probes`), each with a
        'seen' flag: up to `max_probes` in the templates the training text uses and, when
        `train_templates` holds some out, up to `max_probes` more in the held-out ones.

        split: "train" (people whose biography is trained on) or "val" (held-out people). Needs no
        tokenizer: the corpus and split are rebuilt from the settings when setup has not run.
        """
        bios, people = self._split_people(split)
        seen = self.train_templates or [0, 1, 2, 3]
        probes = []
        for flag, templates in ((True, seen), (False, [t for t in range(4) if t not in seen])):
            if templates:
                found = fact_cloze_probes(bios, people, templates, max_probes, seed, max_candidates)
                probes.extend({**p, "seen": flag} for p in found)
        return probes
