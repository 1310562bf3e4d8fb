"""Lightning DataModules and the data pieces they are built from."""

from datamodules.batch import LMBatch, collate_lm
from datamodules.sampler import ResumableSampler
from datamodules.synthetic_bios import BiographyCorpus, generate_biographies
from datamodules.text import PackedDataset, TextDataModule, build_corpus

__all__ = [
    "BiographyCorpus",
    "LMBatch",
    "PackedDataset",
    "ResumableSampler",
    "TextDataModule",
    "build_corpus",
    "collate_lm",
    "generate_biographies",
]
