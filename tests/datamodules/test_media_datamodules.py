import logging
from pathlib import Path
from types import SimpleNamespace
import warnings

import hydra
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError
from torchvision.io import encode_png

from datamodules import (
    AudioBatch,
    AudioDataModule,
    ImageDataModule,
    MediaDecodeError,
    VideoDataModule,
    VisualBatch,
    collate_audio,
    collate_visual,
)
from datamodules.media_io import write_audio, write_video
from datamodules.synthetic_shapes import render_moving_shapes
from tests.conftest import compose_train_cfg
from tests.helpers import resume_trainer

SR = 8000


def fake_trainer(world_size=1, rank=0, epoch=0, ready=0, num_training_batches=float("inf")):
    progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        current_epoch=epoch,
        num_training_batches=num_training_batches,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


def built(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


# Tiny synthetic settings per modality.
SYNTH = {
    "image": lambda **kw: ImageDataModule(**{"image_size": 16, "num_clips": 12, "num_frames": 3, "batch_size": 4, **kw}),
    "video": lambda **kw: VideoDataModule(**{"image_size": 16, "num_clips": 16, "num_frames": 3, "batch_size": 4, **kw}),
    "audio": lambda **kw: AudioDataModule(**{"sample_rate": SR, "clip_seconds": 0.1, "num_clips": 20, "batch_size": 4, **kw}),
}


# ---------------------------------------------------------------------------
# batch types
# ---------------------------------------------------------------------------


def test_collate_and_batch_to():
    visual = collate_visual([{"pixels": torch.zeros(3, 4, 4), "label": 2, "index": 7},
                             {"pixels": torch.ones(3, 4, 4), "label": -1, "index": 8}])
    assert isinstance(visual, VisualBatch) and len(visual) == 2 and visual.pixels.shape == (2, 3, 4, 4)
    assert visual.labels.tolist() == [2, -1] and visual.index.tolist() == [7, 8]
    moved = visual.to(torch.float64)
    assert moved.pixels.dtype == torch.float64 and moved.labels.dtype == torch.long
    audio = collate_audio([{"waveform": torch.zeros(5), "label": 0, "index": 0, "sample_rate": SR}])
    assert isinstance(audio, AudioBatch) and audio.sample_rate == SR and audio.waveform.shape == (1, 5)
    assert audio.to("cpu").sample_rate == SR
    with pytest.raises(ValueError, match="sample_rate"):
        collate_audio([{"waveform": torch.zeros(5)}])


# ---------------------------------------------------------------------------
# synthetic sources
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_synthetic_batches_shapes_ranges_and_labels(modality):
    dm = built(SYNTH[modality]())
    batch = next(iter(dm.train_dataloader()))
    if modality == "audio":
        assert isinstance(batch, AudioBatch) and batch.sample_rate == SR
        x = batch.waveform
        assert x.shape == (4, int(0.1 * SR))
        assert dm.num_classes == 5 and dm.class_names[0] == "tone"
    else:
        assert isinstance(batch, VisualBatch)
        x = batch.pixels
        assert x.shape == ((4, 3, 16, 16) if modality == "image" else (4, 3, 3, 16, 16))
        assert dm.num_classes == 12 and dm.class_names[0] == "circle-horizontal-slow"
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.05
    assert batch.labels.dtype == torch.long and ((batch.labels >= 0) & (batch.labels < dm.num_classes)).all()
    assert batch.index.dtype == torch.long and (batch.index < len(dm.train_dataset)).all()
    assert dm.num_bad_files == 0
    # The same settings give the same data and split.
    again = built(SYNTH[modality]())
    assert torch.equal(again.train_dataset.items, dm.train_dataset.items)
    assert torch.equal(again.val_dataset.labels, dm.val_dataset.labels)


def test_image_frames_of_one_clip_stay_in_one_split():
    dm = built(SYNTH["image"](val_fraction=0.25))
    train, val = dm.item_sources["train"], dm.item_sources["val"]
    assert len(val) == 3 * 3 and not set(train) & set(val)
    assert all(train.count(s) == 3 for s in set(train))  # every frame of a clip is an image
    assert dm.item_sources["test"] == val  # test_fraction 0: test = val


def test_video_synthetic_matches_generator_with_stride():
    dm = built(VideoDataModule(num_frames=3, frame_stride=2, image_size=16, num_clips=6, batch_size=1,
                               val_fraction=0.0, data_seed=4))
    videos, labels = render_moving_shapes(6, 5, 16, seed=4)  # (3 - 1) * 2 + 1 = 5 frames rendered
    expected = videos[:, ::2].permute(0, 1, 4, 2, 3)  # [N, 3, C, H, W]
    assert torch.equal(dm.train_dataset.items, expected) and torch.equal(dm.train_dataset.labels, labels)
    sample = dm.train_dataset[0]["pixels"]
    assert sample.shape == (3, 3, 16, 16)  # [C, T, H, W]
    assert torch.allclose(sample, expected[0].permute(1, 0, 2, 3).float() / 127.5 - 1)


def test_video_synthetic_short_clip_pad_and_skip():
    padded = built(VideoDataModule(num_frames=4, synthetic_frames=2, image_size=8, num_clips=4, batch_size=1,
                                   val_fraction=0.0))
    items = padded.train_dataset.items
    assert items.shape[1] == 4 and torch.equal(items[:, 2], items[:, 1]) and torch.equal(items[:, 3], items[:, 1])
    with pytest.raises(ValueError, match="empty"):
        built(VideoDataModule(num_frames=4, synthetic_frames=2, image_size=8, num_clips=4, batch_size=1,
                              val_fraction=0.0, short_clip="skip"))


def test_separate_test_split():
    dm = built(SYNTH["audio"](val_fraction=0.2, test_fraction=0.2))
    assert len(dm.val_dataset) == 4 and len(dm.test_dataset) == 4 and len(dm.train_dataset) == 12
    assert not set(dm.item_sources["test"]) & set(dm.item_sources["val"])
    assert len(list(dm.test_dataloader())) == 1


def test_invalid_settings():
    with pytest.raises(ValueError, match="data.on_bad_file"):
        ImageDataModule(on_bad_file="ignore")
    with pytest.raises(ValueError, match="data.short_clip"):
        VideoDataModule(short_clip="loop")
    with pytest.raises(ValueError, match="data.val_fraction"):
        AudioDataModule(val_fraction=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        ImageDataModule().train_dataloader()


# ---------------------------------------------------------------------------
# folders of files
# ---------------------------------------------------------------------------


def _frames(n: int, seed: int = 0) -> torch.Tensor:
    videos, _ = render_moving_shapes(1, n, 32, seed=seed)
    return videos[0]


def write_good(path: Path, modality: str, seed: int = 0, frames: int = 6, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if modality == "image":
        img = torch.nn.functional.interpolate(_frames(1, seed)[0].permute(2, 0, 1)[None].float(), size=(24, 40))
        path.write_bytes(bytes(encode_png(img[0].round().to(torch.uint8)).numpy()))
    elif modality == "video":
        write_video(path, _frames(frames, seed), fps=8)
    else:
        t = torch.arange(int(seconds * SR)) / SR
        write_audio(path, 0.5 * torch.sin(2 * torch.pi * (300 + 50 * seed) * t), SR)
    return path


SUFFIX = {"image": ".png", "video": ".mp4", "audio": ".wav"}
# decode="eager" unless a test passes decode="lazy" (the lazy path: tests/datamodules/test_media_lazy.py).
FILE_DM = {
    "image": lambda src, **kw: ImageDataModule(source=str(src), **{"image_size": 16, "batch_size": 2, "val_fraction": 0.25, "decode": "eager", **kw}),
    "video": lambda src, **kw: VideoDataModule(source=str(src), **{"image_size": 16, "num_frames": 4, "batch_size": 2, "val_fraction": 0.25, "decode": "eager", **kw}),
    "audio": lambda src, **kw: AudioDataModule(source=str(src), **{"sample_rate": SR, "clip_seconds": 0.25, "batch_size": 2, "val_fraction": 0.25, "decode": "eager", **kw}),
}
ITEMS_PER_FILE = {"image": 1, "video": 1, "audio": 2}


def make_folder(root: Path, modality: str) -> list[Path]:
    """Two class folders of two files each, plus files every DataModule must ignore."""
    files = [write_good(root / cls / f"{i}{SUFFIX[modality]}", modality, seed=k)
             for k, (cls, i) in enumerate([("cats", 0), ("cats", 1), ("dogs", 0), ("dogs", 1)])]
    (root / "notes.txt").write_text("not media")
    (root / "cats" / "readme.md").write_text("not media")
    (root / ".cache").mkdir()
    (root / ".cache" / f"x{SUFFIX[modality]}").write_bytes(b"")  # hidden: never read
    return files


@pytest.mark.parametrize("decode", ["eager", "lazy"])
@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_folder_labels_from_sub_folders(tmp_path, modality, decode):
    files = make_folder(tmp_path / "data", modality)
    dm = built(FILE_DM[modality](tmp_path / "data", labels_from_dirs=True, decode=decode))
    assert dm.class_names == ["cats", "dogs"] and dm.num_classes == 2 and dm.num_bad_files == 0
    per_file = ITEMS_PER_FILE[modality]
    assert len(dm.train_dataset) == 3 * per_file and len(dm.val_dataset) == 1 * per_file
    for split in ("train", "val"):
        dataset = getattr(dm, f"{split}_dataset")
        for src, label in zip(dm.item_sources[split], dataset.labels.tolist()):
            assert Path(src).parent.name == dm.class_names[label]
    assert sorted(set(dm.item_sources["train"]) | set(dm.item_sources["val"])) == sorted(map(str, files))
    batch = next(iter(dm.train_dataloader()))
    key = "waveform" if modality == "audio" else "pixels"
    shape = {"image": (2, 3, 16, 16), "video": (2, 3, 4, 16, 16), "audio": (2, int(0.25 * SR))}[modality]
    assert getattr(batch, key).shape == shape

    unlabelled = built(FILE_DM[modality](tmp_path / "data", decode=decode))
    assert unlabelled.num_classes == 0 and unlabelled.class_names == []
    assert (unlabelled.train_dataset.labels == -1).all()


def test_glob_and_single_file_sources(tmp_path):
    files = make_folder(tmp_path / "data", "image")
    dm = built(FILE_DM["image"](tmp_path / "data" / "*" / "*.png", labels_from_dirs=True, val_fraction=0.0))
    assert len(dm.train_dataset) == 4 and dm.class_names == ["cats", "dogs"]
    single = built(FILE_DM["image"](files[0], val_fraction=0.0, batch_size=1))
    assert len(single.train_dataset) == 1
    with pytest.raises(FileNotFoundError):
        built(FILE_DM["image"](tmp_path / "nothing"))


def test_labels_from_dirs_needs_class_folders(tmp_path):
    write_good(tmp_path / "data" / "loose.png", "image")
    with pytest.raises(ValueError, match="loose.png"):
        built(FILE_DM["image"](tmp_path / "data", labels_from_dirs=True))


GOOD_BYTES: dict[str, bytes] = {}


def _bad_content(case: str, modality: str, tmp: Path) -> bytes:
    if modality not in GOOD_BYTES:
        GOOD_BYTES[modality] = write_good(tmp / f"ref{SUFFIX[modality]}", modality).read_bytes()
    good = GOOD_BYTES[modality]
    if case == "empty":
        return b""
    if case == "truncated":
        return good[: len(good) // 2]
    if case == "wrong_format":
        return b"plain text renamed to a media suffix\n" * 3
    return good[:16] + np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
@pytest.mark.parametrize("case", ["empty", "truncated", "wrong_format", "undecodable"])
def test_bad_file_errors_or_is_skipped_and_counted(tmp_path, caplog, modality, case):
    root = tmp_path / "data"
    make_folder(root, modality)
    bad = root / "dogs" / f"zz_bad{SUFFIX[modality]}"
    bad.write_bytes(_bad_content(case, modality, tmp_path))

    with pytest.raises(MediaDecodeError) as err:
        built(FILE_DM[modality](root))
    assert str(bad) in str(err.value)

    with caplog.at_level(logging.WARNING, logger="datamodules.media"):
        dm = built(FILE_DM[modality](root, on_bad_file="skip", labels_from_dirs=True))
    assert dm.num_bad_files == 1 and dm.bad_files == [str(bad)]
    assert str(bad) in caplog.text
    items = len(dm.train_dataset) + len(dm.val_dataset)
    assert items == 4 * ITEMS_PER_FILE[modality]
    assert str(bad) not in dm.item_sources["train"] + dm.item_sources["val"]


def test_explicit_file_with_wrong_suffix_is_bad(tmp_path):
    path = write_good(tmp_path / "clip.mp4", "video")
    renamed = path.rename(tmp_path / "clip.txt")
    with pytest.raises(MediaDecodeError, match="clip.txt.*suffix"):
        built(FILE_DM["video"](renamed, val_fraction=0.0, batch_size=1))
    with pytest.raises(ValueError, match="all 1 video files .* are bad"):
        built(FILE_DM["video"](renamed, val_fraction=0.0, batch_size=1, on_bad_file="skip"))


def test_every_file_bad_is_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="all 3 audio files") as err:
        built(FILE_DM["audio"](tmp_path, on_bad_file="skip"))
    assert "empty file" in str(err.value)


def test_short_video_file_pad_or_skip(tmp_path):
    write_good(tmp_path / "long.mp4", "video", frames=6)
    short = write_good(tmp_path / "short.gif", "video", frames=2)
    dm = built(FILE_DM["video"](tmp_path, val_fraction=0.0, batch_size=1))
    assert len(dm.train_dataset) == 2
    clip = dm.train_dataset.items[dm.item_sources["train"].index(str(short))]
    assert torch.equal(clip[2], clip[1]) and torch.equal(clip[3], clip[1]) and not torch.equal(clip[0], clip[1])

    skipping = built(FILE_DM["video"](tmp_path, val_fraction=0.0, batch_size=1, short_clip="skip"))
    assert len(skipping.train_dataset) == 1 and skipping.num_short_skipped == 1
    assert skipping.item_sources["train"] == [str(tmp_path / "long.mp4")] and skipping.num_bad_files == 0


def test_video_file_fps_and_stride(tmp_path):
    path = write_good(tmp_path / "v.mp4", "video", frames=8)
    native = built(FILE_DM["video"](path, val_fraction=0.0, batch_size=1, num_frames=8, image_size=32))
    every = native.train_dataset.items[0]
    half = built(FILE_DM["video"](path, val_fraction=0.0, batch_size=1, num_frames=4, image_size=32, fps=4))
    strided = built(FILE_DM["video"](path, val_fraction=0.0, batch_size=1, num_frames=4, image_size=32,
                                     frame_stride=2))
    assert torch.equal(half.train_dataset.items[0], every[::2])
    assert torch.equal(strided.train_dataset.items[0], every[::2])


def test_audio_files_cut_into_clips_short_padded_or_skipped(tmp_path):
    write_good(tmp_path / "long.wav", "audio", seconds=0.6)  # 2 clips of 0.25 s, 0.1 s tail dropped
    write_good(tmp_path / "short.flac", "audio", seconds=0.1)
    dm = built(FILE_DM["audio"](tmp_path, val_fraction=0.0, batch_size=1))
    sources = dm.item_sources["train"]
    assert sources.count(str(tmp_path / "long.wav")) == 2 and sources.count(str(tmp_path / "short.flac")) == 1
    padded = dm.train_dataset.items[sources.index(str(tmp_path / "short.flac"))]
    assert padded[: int(0.1 * SR) - 5].abs().max() > 0.1 and (padded[int(0.1 * SR) + 5 :] == 0).all()
    skipping = built(FILE_DM["audio"](tmp_path, val_fraction=0.0, batch_size=1, short_clip="skip"))
    assert len(skipping.train_dataset) == 2 and skipping.num_short_skipped == 1


# ---------------------------------------------------------------------------
# world size, sharding, exact resume
# ---------------------------------------------------------------------------


def test_global_batch_size_must_divide_by_world_size():
    dm = SYNTH["video"](batch_size=4)
    dm.trainer = fake_trainer(world_size=3)
    with pytest.raises(ValueError, match="data.batch_size=4"):
        dm.setup("fit")
    dm.trainer = fake_trainer(world_size=2)
    dm.setup("fit")
    assert dm.per_rank_batch_size() == 2


def test_ranks_get_disjoint_train_shards():
    seen = []
    for rank in range(2):
        dm = SYNTH["audio"](batch_size=4)
        dm.trainer = fake_trainer(world_size=2, rank=rank)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert all(len(b) == 2 for b in batches)
        seen.append({i for b in batches for i in b.index.tolist()})
    assert not seen[0] & seen[1]


def _order(loader) -> list[list[int]]:
    return [b.index.tolist() for b in loader]


def test_state_dict_resumes_the_exact_train_order():
    d = built(SYNTH["video"]())
    assert d.state_dict() == {}
    loader = d.train_dataloader()
    loader.sampler.set_epoch(1)
    uninterrupted = _order(loader)
    assert len(uninterrupted) >= 3

    d.trainer = fake_trainer(epoch=1, ready=2, num_training_batches=len(uninterrupted))
    state = d.state_dict()
    assert state["sampler"] == {"epoch": 1, "consumed": 2 * 4}

    resumed = built(SYNTH["video"]())
    resumed.load_state_dict(state)  # before the loader exists (Lightning's order) ...
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)
    assert _order(loader) == uninterrupted[2:]
    loader.sampler.set_epoch(2)
    assert len(_order(loader)) == len(uninterrupted)

    late = built(SYNTH["video"]())
    loader = late.train_dataloader()
    late.load_state_dict(state)  # ... or after
    loader.sampler.set_epoch(1)
    assert _order(loader) == uninterrupted[2:]

    d.trainer = fake_trainer(epoch=2, ready=len(uninterrupted), num_training_batches=len(uninterrupted))
    assert d.state_dict()["sampler"] == {"epoch": 3, "consumed": 0}


def _recorder():
    """A LightningModule that records the dataset indices of every training batch (and learns nothing)."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.index.tolist())
            x = batch.pixels if hasattr(batch, "pixels") else batch.waveform
            return self.layer(x.float().reshape(x.shape[0], -1).mean(1, keepdim=True)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Recorder


def test_lightning_mid_epoch_resume_replays_the_remaining_batches(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    Recorder = _recorder()

    def data():
        return VideoDataModule(num_clips=16, num_frames=2, image_size=8, batch_size=4, val_fraction=0.0)

    trainer = resume_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Recorder()
        trainer(max_epochs=2).fit(reference, datamodule=data())
        assert len(reference.seen) == 8  # 4 batches per epoch
        step = 6  # inside the second epoch
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1)
        trainer(max_steps=step, callbacks=[callback]).fit(Recorder(), datamodule=data())
        (ckpt,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
        resumed = Recorder()
        trainer(max_epochs=2).fit(resumed, datamodule=data(), ckpt_path=str(ckpt))
    assert resumed.seen == reference.seen[step:]


@pytest.mark.parametrize("kind", ["video", "image", "audio"])
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_resume_from_the_final_last_ckpt_of_a_run_that_never_validated(tmp_path, kind, where):
    """The project's ModelCheckpoint, monitoring a metric never logged (no validation): the only
    checkpoint is the `last.ckpt` of the final step, and resuming from it replays exactly the rest."""

    from callbacks.checkpoint import ModelCheckpoint

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    Recorder = _recorder()

    def data():
        return SYNTH[kind](batch_size=4, val_fraction=0.0)

    trainer = resume_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Recorder()
        trainer(max_epochs=2).fit(reference, datamodule=data())
        per_epoch = len(reference.seen) // 2
        stop = per_epoch + 2 if where == "mid_epoch" else per_epoch
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
        trainer(max_steps=stop, callbacks=[callback]).fit(Recorder(), datamodule=data())
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
        resumed = Recorder()
        trainer(max_epochs=2).fit(resumed, datamodule=data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert per_epoch >= 3 and resumed.seen == reference.seen[stop:]


def test_worker_processes_load_batches():
    dm = built(SYNTH["audio"](num_workers=1))
    assert len(list(dm.val_dataloader())) == 1
    assert sum(len(b) for b in dm.train_dataloader()) == 16


# ---------------------------------------------------------------------------
# Hydra configs
# ---------------------------------------------------------------------------

SMALL_OVERRIDES = {
    "image": ["data.num_clips=8", "data.num_frames=2", "data.batch_size=4"],
    "video": ["data.num_clips=12", "data.num_frames=3", "data.batch_size=4"],
    "audio": ["data.num_clips=12", "data.clip_seconds=0.1", "data.batch_size=4"],
}


@pytest.mark.parametrize("modality, cls", [("image", ImageDataModule), ("video", VideoDataModule), ("audio", AudioDataModule)])
def test_compose_and_instantiate(tmp_path, modality, cls):
    cfg = compose_train_cfg([f"data={modality}", "~experiment", "seed=5", *SMALL_OVERRIDES[modality]], tmp_path)
    assert cfg.data.seed == 5
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, cls) and dm.seed == 5
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_yaml_defaults_match_the_datamodule_defaults(tmp_path, modality):
    cfg = compose_train_cfg([f"data={modality}", "~experiment"], tmp_path)
    expected = {
        "image": {"image_size": 32, "num_clips": 64, "num_frames": 8, "batch_size": 16},
        "video": {"num_frames": 9, "image_size": 32, "num_clips": 256, "batch_size": 8},
        "audio": {"clip_seconds": 1.0, "sample_rate": 16000, "num_clips": 256, "batch_size": 16},
    }[modality]
    assert {k: cfg.data[k] for k in expected} == expected


@pytest.mark.parametrize(
    "modality, override, key",
    [
        ("video", "data.num_frame=3", "data.num_frame"),
        ("video", "data.fps=fast", "data.fps"),
        ("image", "data.image_sise=16", "data.image_sise"),
        ("audio", "data.sample_rat=8000", "data.sample_rat"),
        ("audio", "data.clip_seconds=long", "data.clip_seconds"),
    ],
)
def test_bad_keys_and_types_fail_at_compose_naming_the_key(tmp_path, modality, override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        compose_train_cfg([f"data={modality}", "~experiment", override], tmp_path)
    assert key in str(err.value) + str(err.value.__cause__)
