"""Token caches: sharded atomic writing, resume after interruption, tokenizer mismatch refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.tokens import TokenBatch, TokenDataModule
from models.tokenizers.checkpoint import save_tokenizer_export
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer
from tools.tokenize_dataset import tokenize

DATA = ["~experiment", "data=video", "data.num_clips=10", "data.num_frames=5", "data.image_size=16",
        "data.val_fraction=0.2", "data.batch_size=2"]


def _tokenizer_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = TokenizerConfig(preset="tiny", scales=[1, 2, 4])
    save_tokenizer_export(path, VisualTokenizer(cfg), "visual", cfg.to_dict())
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return _tokenizer_file(tmp_path_factory.mktemp("tok") / "tok.pt", seed=0)


def _load(cache: Path, tok: Path) -> TokenDataModule:
    dm = TokenDataModule(str(cache), str(tok), batch_size=2)
    dm.setup("fit")
    return dm


def test_cache_round_trip_matches_the_tokenizer(tmp_path, tok_path):
    cache = tmp_path / "cache"
    summary = tokenize(str(tok_path), str(cache), DATA, shard_size=3, batch_size=2)
    assert summary["train"]["items"] == 8 and summary["train"]["shards"] == 3 and summary["val"]["items"] == 2
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "visual" and manifest["splits"]["train"]["complete"]
    assert not list(cache.glob(".*tmp"))  # no temp files left behind

    dm = _load(cache, tok_path)
    assert dm.num_classes == 12 and len(dm.train_dataset) == 8
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, TokenBatch) and len(batch.tokens) == 3
    assert batch.tokens[2].shape == (2, 3, 4, 4, 8) and batch.features.shape == (2, 8, 3, 4, 4)
    # the cached tokens are exactly what the tokenizer gives for those clips
    from datamodules.media import VideoDataModule

    vdm = VideoDataModule(num_clips=10, num_frames=5, image_size=16, val_fraction=0.2, batch_size=2)
    vdm.setup("fit")
    pixels = torch.stack([vdm.train_dataset[int(i)]["pixels"] for i in batch.index])
    fresh = dm.tokenizer.encode(pixels)
    assert all(torch.equal(a, b) for a, b in zip(fresh, batch.tokens))
    assert torch.allclose(dm.tokenizer.encode_features(pixels), batch.features)


def test_interrupted_tokenization_resumes_after_last_complete_shard(tmp_path, tok_path):
    full, part = tmp_path / "full", tmp_path / "part"
    tokenize(str(tok_path), str(full), DATA, shard_size=3)
    first = tokenize(str(tok_path), str(part), DATA, shard_size=3, stop_after_shards=2)
    assert first.get("stopped_early") and first["train"]["written"] == 2
    manifest = json.loads((part / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 2 and not manifest["splits"]["train"]["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        _load(part, tok_path)
    second = tokenize(str(tok_path), str(part), DATA, shard_size=3)
    assert second["train"]["skipped"] == 2 and second["train"]["written"] == 1
    a, b = _load(full, tok_path), _load(part, tok_path)
    for x, y in zip(a.train_dataset.tokens, b.train_dataset.tokens):
        assert torch.equal(x, y)
    assert torch.equal(a.train_dataset.labels, b.train_dataset.labels)


def test_cache_refuses_another_tokenizer_and_corruption(tmp_path, tok_path):
    cache = tmp_path / "cache"
    tokenize(str(tok_path), str(cache), DATA, shard_size=4)
    other = _tokenizer_file(tmp_path / "other.pt", seed=1)
    with pytest.raises(ValueError, match="rebuild the cache"):
        _load(cache, other)
    # re-saving the same weights is the same tokenizer (the digest is of weights, not file bytes)
    same = tmp_path / "same.pt"
    from models.tokenizers.checkpoint import load_media_tokenizer

    tok, info = load_media_tokenizer(tok_path)
    save_tokenizer_export(same, tok, "visual", info["config"])
    assert len(_load(cache, same).train_dataset) == 8
    # writing into a cache made by another tokenizer is refused too
    with pytest.raises(ValueError, match="another tokenizer"):
        tokenize(str(other), str(cache), DATA, shard_size=4)
    # a corrupted shard is named
    shard = cache / "train-00000.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="train-00000.pt"):
        _load(cache, tok_path)
    # and a re-run repairs it
    assert tokenize(str(tok_path), str(cache), DATA, shard_size=4)["train"]["written"] == 2
    assert len(_load(cache, tok_path).train_dataset) == 8


def test_tokens_data_config_composes(tmp_path, tok_path):
    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(["~experiment", "data=tokens", f"data.cache_dir={tmp_path}", f"data.tokenizer_ckpt={tok_path}"],
                            tmp_path / "run")
    assert cfg.data._target_ == "datamodules.tokens.TokenDataModule"
    with pytest.raises(Exception, match="data.cache_dirr"):
        compose_train_cfg(["~experiment", "data=tokens", "data.cache_dirr=x"], tmp_path / "run2")


def test_shards_are_memory_mapped_and_equal_the_fully_loaded_cache(tmp_path, tok_path):
    from datamodules.tokens import TokenDataset, collate_tokens

    cache = tmp_path / "cache"
    tokenize(str(tok_path), str(cache), DATA, shard_size=3)
    dm = _load(cache, tok_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    shard_files = [cache / s["file"] for s in manifest["splits"]["train"]["shards"]]
    # the shard files are mapped into this process, not read into it
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else None
    if maps is not None:
        assert all(str(f.resolve()) in maps for f in shard_files)
    # the same items as loading every shard whole and concatenating (the old format of serving)
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in shard_files]
    loaded = TokenDataset(parts)
    mapped = dm.train_dataset
    assert len(mapped) == len(loaded) == 8 and len(mapped.shards) == 3
    for i in range(len(mapped)):
        a, b = mapped[i], loaded[i]
        assert a["label"] == b["label"] and a["index"] == b["index"]
        assert all(torch.equal(x, y) for x, y in zip(a["tokens"], b["tokens"]))
        assert torch.equal(a["features"], b["features"])
    for k in range(len(parts[0]["tokens"])):
        assert torch.equal(mapped.tokens[k], torch.cat([p["tokens"][k] for p in parts]))
    assert torch.equal(mapped.features, torch.cat([p["features"] for p in parts]))
    batch = collate_tokens([mapped[i] for i in (7, 0, 4)])
    assert batch.index.tolist() == [int(mapped.index[i]) for i in (7, 0, 4)]
    with pytest.raises(IndexError):
        mapped[8]
