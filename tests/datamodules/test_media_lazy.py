"""Lazy (per-item) decoding of media files: same items as eager decoding, nothing decoded in setup,
bad files found while loading skipped and counted or stopping the run, and exact resume."""

from __future__ import annotations

import logging
from pathlib import Path
import warnings

import pytest
import torch

import datamodules.media as media
from datamodules import MediaDecodeError, VideoDataModule
from datamodules.media import LazyMediaDataset
from tests.datamodules.test_media_datamodules import (
    FILE_DM,
    ITEMS_PER_FILE,
    SUFFIX,
    _bad_content,
    _recorder,
    built,
    fake_trainer,
    make_folder,
    write_good,
)
from tests.helpers import resume_trainer

KEY = {"image": "pixels", "video": "pixels", "audio": "waveform"}


def _all_items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_lazy_items_equal_eager_items(tmp_path, modality):
    make_folder(tmp_path / "data", modality)
    write_good(tmp_path / "data" / "dogs" / f"odd{SUFFIX[modality]}", modality, seed=7, frames=3, seconds=0.1)
    kw = dict(labels_from_dirs=True, val_fraction=0.2, test_fraction=0.2)  # the short file is padded
    eager = built(FILE_DM[modality](tmp_path / "data", decode="eager", **kw))
    lazy = built(FILE_DM[modality](tmp_path / "data", decode="lazy", **kw))
    assert isinstance(lazy.train_dataset, LazyMediaDataset) and not isinstance(eager.train_dataset, LazyMediaDataset)
    assert lazy.item_sources == eager.item_sources and lazy.class_names == eager.class_names
    for split in ("train", "val", "test"):
        a, b = getattr(eager, f"{split}_dataset"), getattr(lazy, f"{split}_dataset")
        assert len(a) == len(b) > 0
        for x, y in zip(_all_items(a), _all_items(b)):
            assert x.keys() == y.keys() and x["label"] == y["label"] and x["index"] == y["index"]
            assert torch.equal(x[KEY[modality]], y[KEY[modality]])
    # batches through the loaders are the same too
    for x, y in zip(eager.train_dataloader(), lazy.train_dataloader()):
        assert torch.equal(getattr(x, KEY[modality]), getattr(y, KEY[modality])) and torch.equal(x.index, y.index)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, path, *args, **kwargs):
        self.calls.append(str(path))
        return self.fn(path, *args, **kwargs)


def test_setup_only_lists_and_each_item_is_decoded_when_loaded(tmp_path, monkeypatch):
    files = make_folder(tmp_path / "data", "video")
    counter = _Counter(media.read_video)
    monkeypatch.setattr(media, "read_video", counter)
    dm = built(FILE_DM["video"](tmp_path / "data", decode="lazy", val_fraction=0.25))
    assert counter.calls == []  # setup decoded nothing
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1
    sample = dm.train_dataset[1]
    assert counter.calls == [dm.item_sources["train"][1]] and sample["pixels"].shape == (3, 4, 16, 16)
    counter.calls.clear()
    batches = list(dm.train_dataloader())  # batch_size 2, drop_last: one batch of two items
    assert len(batches) == 1 and len(counter.calls) == 2
    assert set(counter.calls) <= set(map(str, files))
    # eager decodes every file in setup
    counter.calls.clear()
    built(FILE_DM["video"](tmp_path / "data", decode="eager", val_fraction=0.25))
    assert sorted(counter.calls) == sorted(map(str, files))


def test_lazy_audio_setup_reads_headers_only(tmp_path, monkeypatch):
    write_good(tmp_path / "long.wav", "audio", seconds=0.6)  # 2 clips of 0.25 s
    write_good(tmp_path / "short.flac", "audio", seconds=0.1)  # 0 clips (skip)
    counter = _Counter(media.read_audio)
    monkeypatch.setattr(media, "read_audio", counter)
    dm = built(FILE_DM["audio"](tmp_path, decode="lazy", val_fraction=0.0, batch_size=1, short_clip="skip"))
    assert counter.calls == [] and len(dm.train_dataset) == 2 and dm.num_short_skipped == 1
    a, b = dm.train_dataset[0], dm.train_dataset[1]
    assert counter.calls == [str(tmp_path / "long.wav")]  # two segments of one file: decoded once
    assert not torch.equal(a["waveform"], b["waveform"])


def _folder_with_bad_file(root: Path, case: str = "truncated") -> Path:
    make_folder(root, "video")
    bad = root / "cats" / f"1b_bad{SUFFIX['video']}"  # sorts between cats/1.mp4 and dogs/0.mp4
    bad.write_bytes(_bad_content(case, "video", root.parent))
    return bad


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_file_found_while_loading_is_skipped_and_counted(tmp_path, caplog, num_workers):
    root = tmp_path / "data"
    bad = _folder_with_bad_file(root)
    dm = built(FILE_DM["video"](root, decode="lazy", on_bad_file="skip", val_fraction=0.0, batch_size=5,
                                num_workers=num_workers))
    assert dm.num_bad_files == 0  # setup did not open the files
    sources = dm.item_sources["train"]
    k = sources.index(str(bad))
    with caplog.at_level(logging.WARNING, logger="datamodules.media"):
        item = dm.train_dataset[k]
    assert str(bad) in caplog.text
    # the next good item stands in, deterministically, and says whom it replaced
    assert item["index"] == k + 1 and [s[:2] for s in item["skipped"]] == [(str(bad), "bad")]
    assert torch.equal(item["pixels"], dm.train_dataset[k + 1]["pixels"])
    (batch,) = list(dm.train_dataloader())
    assert sorted(batch.index.tolist()) == sorted([i for i in range(5) if i != k] + [k + 1])
    assert batch.skipped and dm.num_bad_files == 0  # counted once the batch is used ...
    dm.on_before_batch_transfer(batch, 0)
    assert dm.num_bad_files == 1 and dm.bad_files == [str(bad)]
    dm.on_before_batch_transfer(batch, 0)  # ... and each file once
    assert dm.num_bad_files == 1 and str(bad) in dm.bad_file_reasons
    # a checkpoint carries the count into the resumed run (whether restored before or after setup)
    dm.trainer = fake_trainer(epoch=0, ready=1, num_training_batches=1)
    state = dm.state_dict()
    assert state["skipped_files"]["bad"] == {str(bad): dm.bad_file_reasons[str(bad)]}
    before = FILE_DM["video"](root, decode="lazy", on_bad_file="skip", val_fraction=0.0, batch_size=5)
    before.load_state_dict(state)
    assert built(before).bad_files == [str(bad)]
    after = built(FILE_DM["video"](root, decode="lazy", on_bad_file="skip", val_fraction=0.0, batch_size=5))
    after.load_state_dict(state)
    assert after.bad_files == [str(bad)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_file_found_while_loading_stops_the_run_naming_it(tmp_path, num_workers):
    bad = _folder_with_bad_file(tmp_path / "data", case="undecodable")
    dm = built(FILE_DM["video"](tmp_path / "data", decode="lazy", val_fraction=0.0, batch_size=5,
                                num_workers=num_workers))
    with pytest.raises(MediaDecodeError) as err:
        list(dm.train_dataloader())
    assert str(bad) in str(err.value) and "data.on_bad_file=skip" in str(err.value)


def test_lazy_short_clip_skip_is_replaced_and_counted(tmp_path):
    write_good(tmp_path / "a_long.mp4", "video", frames=6)
    short = write_good(tmp_path / "b_short.gif", "video", frames=2)
    write_good(tmp_path / "c_long.mp4", "video", frames=6, seed=3)
    dm = built(FILE_DM["video"](tmp_path, decode="lazy", val_fraction=0.0, batch_size=3, short_clip="skip"))
    assert len(dm.train_dataset) == 3 and dm.num_short_skipped == 0
    (batch,) = list(dm.train_dataloader())
    assert sorted(batch.index.tolist()) == [0, 2, 2]
    dm.on_before_batch_transfer(batch, 0)
    assert dm.num_short_skipped == 1 and dm.num_bad_files == 0 and str(short) in dm._short_files


def test_every_file_of_a_split_bad_is_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.mp4").write_bytes(b"not a video" * 10)
    dm = built(FILE_DM["video"](tmp_path, decode="lazy", val_fraction=0.0, batch_size=1, on_bad_file="skip"))
    with pytest.raises(ValueError, match="every video file of this split"):
        dm.train_dataset[0]


def test_decode_setting_is_checked():
    with pytest.raises(ValueError, match="data.decode"):
        VideoDataModule(decode="streaming")


def test_lightning_resume_with_lazy_files_and_a_bad_file_replays_the_same_batches(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = tmp_path / "data"
    make_folder(root, "video")
    for i in range(4):
        write_good(root / "birds" / f"{i}.mp4", "video", seed=10 + i, frames=4)
    bad = root / "birds" / "2b_bad.mp4"
    bad.write_bytes(_bad_content("wrong_format", "video", tmp_path))
    Recorder = _recorder()

    class PixelRecorder(Recorder):
        def __init__(self):
            super().__init__()
            self.sums, self.bad_counts = [], []

        def training_step(self, batch, batch_idx):
            self.sums.append(batch.pixels.double().sum().item())
            self.bad_counts.append(self.trainer.datamodule.num_bad_files)
            return super().training_step(batch, batch_idx)

    def data():
        return FILE_DM["video"](root, decode="lazy", on_bad_file="skip", val_fraction=0.0, batch_size=3)

    trainer = resume_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PixelRecorder()
        dm = data()
        trainer(max_epochs=2).fit(reference, datamodule=dm)
        assert len(reference.seen) == 6  # 9 files, 3 per batch
        assert dm.num_bad_files == 1 and dm.bad_files == [str(bad)] and reference.bad_counts[-1] == 1
        step = 4  # inside the second epoch
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1)
        trainer(max_steps=step, callbacks=[callback]).fit(PixelRecorder(), datamodule=data())
        (ckpt,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
        resumed = PixelRecorder()
        trainer(max_epochs=2).fit(resumed, datamodule=data(), ckpt_path=str(ckpt))
    assert resumed.seen == reference.seen[step:] and resumed.sums == reference.sums[step:]
    # the bad file found before the checkpoint is still counted after resuming
    assert resumed.bad_counts == reference.bad_counts[step:]
