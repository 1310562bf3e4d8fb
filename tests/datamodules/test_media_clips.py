"""Several clips per video file: strided windows, clips_per_video, and a per-(seed, epoch) random
offset of the train windows that a resumed run reproduces, in both decode modes."""

from __future__ import annotations

import logging
from pathlib import Path
import warnings

import pytest
import torch

from datamodules import VideoDataModule
from datamodules.media import (
    EpochTaggedSampler,
    LazyMediaDataset,
    MediaDataset,
    VideoClipDataset,
    clip_layout,
    decode_video_file,
    window_offset,
)
from datamodules.media_io import read_video, video_frame_count, write_video
from tests.conftest import compose_train_cfg
from tests.datamodules.test_media_datamodules import _recorder, built, fake_trainer
from tests.helpers import resume_trainer

STEP, BASE = 7, 8  # frame i is a uniform grey of BASE + STEP * i: its index survives the codec


def write_indexed(path: Path, num_frames: int, fps: float = 8) -> Path:
    """A 16x16 video whose frame i is uniformly BASE + STEP * i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = torch.stack([torch.full((16, 16, 3), BASE + STEP * i, dtype=torch.uint8) for i in range(num_frames)])
    return write_video(path, frames, fps=fps)


def frame_ids(pixels: torch.Tensor) -> list[int]:
    """Frame indices held by a sample's pixels (float [3, T, H, W] in [-1, 1])."""
    values = (pixels.float() + 1.0) * 127.5
    return ((values.mean(dim=(0, 2, 3)) - BASE) / STEP).round().long().tolist()


LENGTHS = {"a.mp4": 10, "b.mp4": 23, "c.mp4": 36}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for name, n in LENGTHS.items():
        write_indexed(root / name, n)
    return root


def dm_for(source, **kw) -> VideoDataModule:
    return VideoDataModule(source=str(source), **{"image_size": 16, "num_frames": 4, "batch_size": 1,
                                                  "val_fraction": 0.0, "decode": "eager", **kw})


def windows_by_file(dataset, sources, epoch=0) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for i, src in enumerate(sources):
        out.setdefault(Path(src).name, []).append(frame_ids(dataset[(i, epoch)]["pixels"]))
    return out


def test_clip_layout_counts():
    # (frames, num_frames, stride, clips_per_video, short_clip) -> (clips, spare frames)
    assert clip_layout(10, 4, 4, 0, "pad") == (2, 2)
    assert clip_layout(36, 4, 4, 0, "pad") == (9, 0)
    assert clip_layout(36, 4, 6, 3, "pad") == (3, 20)
    assert clip_layout(36, 4, 2, 0, "pad") == (17, 0)  # overlapping windows
    assert clip_layout(4, 4, 4, 0, "pad") == (1, 0)
    assert clip_layout(3, 4, 4, 0, "pad") == (1, 0) and clip_layout(3, 4, 4, 0, "skip") == (0, 0)
    assert clip_layout(23, 4, 4, 1, "pad") == (1, 19)


@pytest.mark.parametrize("fmt", [".mp4", ".gif"])
def test_frame_count_from_packets_matches_the_decoder(tmp_path, fmt):
    path = write_indexed(tmp_path / f"v{fmt}", 23)
    for fps, stride in [(None, 1), (None, 3), (4, 1), (12.5, 1)]:
        assert video_frame_count(path, fps, stride) == read_video(path, fps=fps, stride=stride)[0].shape[0]


@pytest.mark.parametrize("decode", ["eager", "lazy"])
@pytest.mark.parametrize(
    "kw, starts",
    [
        # as many non-overlapping windows as fit
        (dict(clips_per_video=0), {"a.mp4": [0, 4], "b.mp4": [0, 4, 8, 12, 16], "c.mp4": list(range(0, 33, 4))}),
        # at most 3, every 6 frames
        (dict(clips_per_video=3, clip_stride=6), {"a.mp4": [0, 6], "b.mp4": [0, 6, 12], "c.mp4": [0, 6, 12]}),
        # overlapping windows, at most 2
        (dict(clips_per_video=2, clip_stride=2), {"a.mp4": [0, 2], "b.mp4": [0, 2], "c.mp4": [0, 2]}),
    ],
)
def test_clips_per_file_are_the_expected_windows(videos, decode, kw, starts):
    dm = built(dm_for(videos, decode=decode, **kw))
    assert isinstance(dm.train_dataset, VideoClipDataset)
    got = windows_by_file(dm.train_dataset, dm.item_sources["train"])
    assert got == {name: [list(range(s, s + 4)) for s in ss] for name, ss in starts.items()}
    assert len(dm.train_dataset) == sum(map(len, starts.values()))
    batch = next(iter(dm.train_dataloader()))
    assert batch.pixels.shape == (1, 3, 4, 16, 16)


@pytest.mark.parametrize("decode", ["eager", "lazy"])
def test_windows_count_kept_frames_after_frame_stride(videos, decode):
    dm = built(dm_for(videos / "c.mp4", decode=decode, frame_stride=2, clips_per_video=0, clip_stride=5))
    # 36 frames -> 18 kept (0, 2, .., 34); windows of 4 kept frames every 5 kept frames: 3 clips
    got = windows_by_file(dm.train_dataset, dm.item_sources["train"])["c.mp4"]
    assert got == [[2 * (s + t) for t in range(4)] for s in (0, 5, 10)]


def test_labels_and_splits_stay_by_file(tmp_path):
    for cls in ("cats", "dogs"):
        for i in range(3):
            write_indexed(tmp_path / cls / f"{i}.mp4", 12)
    dm = built(dm_for(tmp_path, clips_per_video=0, labels_from_dirs=True, val_fraction=0.3, batch_size=2))
    train, val = dm.item_sources["train"], dm.item_sources["val"]
    assert len(train) == 4 * 3 and len(val) == 2 * 3 and not set(train) & set(val)
    for split in ("train", "val"):
        labels = getattr(dm, f"{split}_dataset").labels.tolist()
        assert [dm.class_names[label] for label in labels] == [Path(s).parent.name for s in dm.item_sources[split]]


def all_items(dataset, epoch) -> list[dict]:
    return [dataset[(i, epoch)] for i in range(len(dataset))]


def test_eager_and_lazy_give_the_same_items(videos, tmp_path):
    for name, n in LENGTHS.items():  # a bigger set, so there is a val split
        write_indexed(tmp_path / name, n)
    write_indexed(tmp_path / "d.mp4", 17)
    write_indexed(tmp_path / "e.mp4", 3)  # short: padded
    kw = dict(clips_per_video=3, clip_stride=5, random_offset=True, val_fraction=0.4, seed=3)
    eager = built(dm_for(tmp_path, decode="eager", **kw))
    lazy = built(dm_for(tmp_path, decode="lazy", **kw))
    assert eager.item_sources == lazy.item_sources and len(eager.val_dataset) > 0
    assert eager.train_dataset.frames is not None and lazy.train_dataset.frames is None
    for split in ("train", "val"):
        for epoch in (0, 1):
            for x, y in zip(all_items(getattr(eager, f"{split}_dataset"), epoch),
                            all_items(getattr(lazy, f"{split}_dataset"), epoch)):
                assert x["index"] == y["index"] and x["label"] == y["label"]
                assert torch.equal(x["pixels"], y["pixels"])
    for x, y in zip(eager.train_dataloader(), lazy.train_dataloader()):
        assert torch.equal(x.pixels, y.pixels) and torch.equal(x.index, y.index)


def test_random_offset_moves_train_windows_per_epoch_only(videos):
    kw = dict(clips_per_video=2, clip_stride=4, random_offset=True, seed=11)
    dm = built(dm_for(videos, **kw))
    ds = dm.train_dataset
    assert ds.epoch_dependent and isinstance(dm.train_dataloader().sampler, EpochTaggedSampler)
    starts = {e: [ds.window_start(i, e) for i in range(len(ds))] for e in range(6)}
    assert len({tuple(v) for v in starts.values()}) > 1  # the windows change between epochs
    for e, ss in starts.items():
        got = windows_by_file(ds, dm.item_sources["train"], epoch=e)
        for i, (src, k) in enumerate(zip(dm.item_sources["train"], ds.segments)):
            offset = ss[i] - 4 * k
            assert 0 <= offset < 4 and ss[i] + 4 <= LENGTHS[Path(src).name]  # inside [0, stride), inside the file
        assert [w for ws in got.values() for w in ws] == [list(range(s, s + 4)) for s in ss]
    # the same (seed, epoch) gives the same windows in a fresh DataModule (e.g. a resumed run) ...
    again = built(dm_for(videos, decode="lazy", **kw)).train_dataset
    assert all([again.window_start(i, e) for i in range(len(again))] == starts[e] for e in starts)
    # ... and the offset is a hash of (seed, epoch, file), not global random state
    torch.manual_seed(0)
    assert window_offset(11, 2, 1, 4) == window_offset(11, 2, 1, 4)
    other = built(dm_for(videos, **{**kw, "seed": 12})).train_dataset
    assert any([other.window_start(i, e) for i in range(len(other))] != starts[e] for e in starts)
    # a clip of a file with no spare frames does not move
    short = built(dm_for(videos / "a.mp4", clips_per_video=0, random_offset=True)).train_dataset
    assert short.spans == [3, 3] and built(dm_for(videos / "c.mp4", clips_per_video=0,
                                                  random_offset=True)).train_dataset.spans == [1] * 9


def test_random_offset_never_applies_to_val(tmp_path):
    for i in range(6):
        write_indexed(tmp_path / f"{i}.mp4", 15)
    dm = built(dm_for(tmp_path, clips_per_video=2, clip_stride=5, random_offset=True, val_fraction=0.34,
                      test_fraction=0.17))
    for split in ("val", "test"):
        ds = getattr(dm, f"{split}_dataset")
        assert len(ds) > 0 and not ds.epoch_dependent and set(ds.spans) == {1}
        assert not isinstance(getattr(dm, f"{split}_dataloader")().sampler, EpochTaggedSampler)
        for e in (0, 3):
            assert [frame_ids(x["pixels"])[0] for x in all_items(ds, e)] == [5 * k for k in ds.segments]
    assert set(dm.train_dataset.spans) == {5}


@pytest.mark.parametrize("decode, num_workers", [("eager", 0), ("lazy", 0), ("lazy", 1)])
def test_loader_windows_follow_the_sampler_epoch_and_resume_exactly(videos, decode, num_workers):
    kw = dict(clips_per_video=3, clip_stride=4, random_offset=True, seed=5, decode=decode, batch_size=2,
              num_workers=num_workers)

    def batches(loader, epoch):
        loader.sampler.set_epoch(epoch)
        return [(b.index.tolist(), b.pixels) for b in loader]

    dm = built(dm_for(videos, **kw))
    ds, loader = dm.train_dataset, dm.train_dataloader()
    epochs = {e: batches(loader, e) for e in (1, 2)}
    for e, bs in epochs.items():  # each batch holds the windows of (its indices, the sampler's epoch)
        for index, pixels in bs:
            assert [frame_ids(p) for p in pixels] == [list(range(ds.window_start(i, e), ds.window_start(i, e) + 4))
                                                       for i in index]
    assert [ds.window_start(i, 1) for i in range(len(ds))] != [ds.window_start(i, 2) for i in range(len(ds))]

    full = epochs[1]
    dm.trainer = fake_trainer(epoch=1, ready=2, num_training_batches=len(full))
    state = dm.state_dict()
    resumed = dm_for(videos, **kw)
    resumed.load_state_dict(state)
    loader = built(resumed).train_dataloader()
    rest = batches(loader, 1)
    assert [i for i, _ in rest] == [i for i, _ in full[2:]]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(rest, full[2:]))


def test_lightning_resume_replays_the_same_clips(videos, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    Recorder = _recorder()

    class PixelRecorder(Recorder):
        def __init__(self):
            super().__init__()
            self.frames = []

        def training_step(self, batch, batch_idx):
            self.frames.append([frame_ids(p) for p in batch.pixels])
            return super().training_step(batch, batch_idx)

    def data():
        return dm_for(videos, decode="lazy", clips_per_video=3, clip_stride=4, random_offset=True, batch_size=2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PixelRecorder()
        resume_trainer(max_epochs=2).fit(reference, datamodule=data())
        per_epoch = len(reference.seen) // 2
        assert per_epoch == 4  # 8 clips (2 + 3 + 3), 2 per batch
        assert reference.frames[:per_epoch] != reference.frames[per_epoch:]
        step = per_epoch + 1  # inside the second epoch
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1)
        resume_trainer(max_steps=step, callbacks=[callback]).fit(PixelRecorder(), datamodule=data())
        (ckpt,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
        resumed = PixelRecorder()
        resume_trainer(max_epochs=2).fit(resumed, datamodule=data(), ckpt_path=str(ckpt))
    assert resumed.seen == reference.seen[step:] and resumed.frames == reference.frames[step:]
    # every step got the windows of its epoch (Lightning's set_epoch reaches the tagged sampler)
    ds = built(data()).train_dataset
    for step_idx, (index, frames) in enumerate(zip(reference.seen, reference.frames)):
        epoch = step_idx // per_epoch
        assert frames == [list(range(ds.window_start(i, epoch), ds.window_start(i, epoch) + 4)) for i in index]


@pytest.mark.parametrize("decode", ["eager", "lazy"])
def test_file_shorter_than_a_clip_pads_or_is_skipped_and_counted(videos, tmp_path, decode):
    write_indexed(tmp_path / "long.mp4", 10)
    write_indexed(tmp_path / "short.mp4", 3)
    skipping = built(dm_for(tmp_path, decode=decode, clips_per_video=0, short_clip="skip"))
    assert skipping.num_short_skipped == 1 and skipping.num_bad_files == 0
    assert skipping.item_sources["train"] == [str(tmp_path / "long.mp4")] * 2
    padding = built(dm_for(tmp_path, decode=decode, clips_per_video=0, random_offset=True))
    sources = padding.item_sources["train"]
    assert sources.count(str(tmp_path / "short.mp4")) == 1 and padding.num_short_skipped == 0
    clip = padding.train_dataset[(sources.index(str(tmp_path / "short.mp4")), 4)]["pixels"]
    assert frame_ids(clip) == [0, 1, 2, 2]


def test_default_options_reproduce_one_clip_from_the_first_frame(videos):
    for decode, cls in (("eager", MediaDataset), ("lazy", LazyMediaDataset)):
        dm = built(dm_for(videos, decode=decode))
        assert type(dm.train_dataset) is cls and not dm.uses_windows and len(dm.train_dataset) == 3
        assert not isinstance(dm.train_dataloader().sampler, EpochTaggedSampler)
        for i, src in enumerate(dm.item_sources["train"]):
            expected = decode_video_file(Path(src), 4, None, 1, 16, "pad")[0]
            assert torch.equal(dm.train_dataset[i]["pixels"], dm.train_dataset.convert(expected))
            assert frame_ids(dm.train_dataset[i]["pixels"]) == [0, 1, 2, 3]
        # the first window of the windowed path is the same clip
        windowed = built(dm_for(videos, decode=decode, clips_per_video=0))
        first = [k for k, s in enumerate(windowed.train_dataset.segments) if s == 0]
        assert [windowed.item_sources["train"][k] for k in first] == dm.item_sources["train"]
        for i, k in enumerate(first):
            assert torch.equal(windowed.train_dataset[k]["pixels"], dm.train_dataset[i]["pixels"])


def test_invalid_clip_settings():
    with pytest.raises(ValueError, match="data.clips_per_video"):
        VideoDataModule(clips_per_video=-1)
    with pytest.raises(ValueError, match="data.clip_stride"):
        VideoDataModule(clip_stride=0)


def test_synthetic_source_ignores_the_clip_options():
    kw = dict(image_size=16, num_clips=8, num_frames=3, batch_size=4)
    plain = built(VideoDataModule(**kw))
    windowed = built(VideoDataModule(clips_per_video=0, clip_stride=1, random_offset=True, **kw))
    assert isinstance(windowed.train_dataset, MediaDataset) and not windowed.uses_windows
    assert torch.equal(plain.train_dataset.items, windowed.train_dataset.items)


def test_yaml_has_the_clip_options_with_their_defaults(tmp_path):
    cfg = compose_train_cfg(["data=video", "~experiment"], tmp_path)
    assert (cfg.data.clips_per_video, cfg.data.clip_stride, cfg.data.random_offset) == (1, None, False)
    cfg = compose_train_cfg(["data=video", "~experiment", "data.clips_per_video=0", "data.clip_stride=4",
                             "data.random_offset=true"], tmp_path)
    assert (cfg.data.clips_per_video, cfg.data.clip_stride, cfg.data.random_offset) == (0, 4, True)
