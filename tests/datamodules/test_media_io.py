import builtins
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from datamodules.media_io import (
    MediaDecodeError,
    read_audio,
    read_image,
    read_video,
    write_audio,
    write_video,
)
from datamodules.synthetic_shapes import render_moving_shapes

FPS = 8


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    videos, _ = render_moving_shapes(1, 12, 32, seed=0, background="plain")
    return videos[0]  # [12, 32, 32, 3]


@pytest.fixture(scope="module")
def image(clip) -> torch.Tensor:
    return clip[0].permute(2, 0, 1).contiguous()  # [3, 32, 32]


def wave(seconds: float = 0.5, sr: int = 16000, freq: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return 0.5 * torch.sin(2 * torch.pi * freq * t)


def save_bytes(path: Path, data) -> Path:
    path.write_bytes(bytes(data.numpy()) if isinstance(data, torch.Tensor) else data)
    return path


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------


def test_image_png_round_trip_is_exact(tmp_path, image):
    out = read_image(save_bytes(tmp_path / "a.png", encode_png(image)))
    assert out.dtype == torch.uint8 and torch.equal(out, image)


def test_image_jpeg_round_trip_is_close(tmp_path, image):
    for name in ("a.jpg", "b.jpeg"):
        out = read_image(save_bytes(tmp_path / name, encode_jpeg(image, quality=95)))
        assert out.shape == (3, 32, 32) and (out.float() - image.float()).abs().mean() < 6


def test_image_grayscale_becomes_rgb(tmp_path, image):
    gray = read_image(save_bytes(tmp_path / "g.png", encode_png(image[:1])))
    assert gray.shape == (3, 32, 32) and torch.equal(gray[0], gray[2]) and torch.equal(gray[0], image[0])


def test_image_rgba_becomes_rgb(tmp_path, image):
    pil = pytest.importorskip("PIL.Image")  # torchvision cannot encode RGBA
    rgba = torch.cat([image, torch.full_like(image[:1], 255)])
    pil.fromarray(rgba.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")  # 4 channels: RGBA
    assert torch.equal(read_image(tmp_path / "a.png"), image)


def test_image_webp(tmp_path, image):
    pil = pytest.importorskip("PIL.Image")
    path = tmp_path / "a.webp"
    pil.fromarray(image.permute(1, 2, 0).numpy()).save(path, lossless=True)
    assert torch.equal(read_image(path), image)


@pytest.mark.parametrize("suffix, tol", [(".mp4", 8), (".gif", 25), (".webm", 10), (".avi", 15)])
def test_video_round_trip(tmp_path, clip, suffix, tol):
    path = write_video(tmp_path / f"clip{suffix}", clip, fps=FPS)
    frames, info = read_video(path)
    assert frames.shape == clip.shape and frames.dtype == torch.uint8
    assert (frames.float() - clip.float()).abs().mean() < tol
    assert info["num_decoded"] == 12 and abs(info["native_fps"] - FPS) < 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_video_frame_sampling(tmp_path, clip):
    path = write_video(tmp_path / "clip.mp4", clip, fps=FPS)
    every, _ = read_video(path)
    first, _ = read_video(path, num_frames=4)
    assert torch.equal(first, every[:4])
    strided, info = read_video(path, num_frames=3, stride=3)
    assert torch.equal(strided, every[[0, 3, 6]]) and info["times"] == pytest.approx([0, 0.375, 0.75])
    # Half the native rate drops every other frame; double the rate shows each frame twice.
    half, info = read_video(path, num_frames=4, fps=FPS / 2)
    assert torch.equal(half, every[[0, 2, 4, 6]]) and info["times"] == pytest.approx([0, 0.25, 0.5, 0.75])
    double, _ = read_video(path, num_frames=5, fps=2 * FPS)
    assert torch.equal(double, every[[0, 0, 1, 1, 2]])
    whole, _ = read_video(path, fps=2 * FPS)
    assert whole.shape[0] == 24  # 12 frames of 1/8 s at 16 fps


def test_video_odd_size_mp4(tmp_path, clip):
    frames, _ = read_video(write_video(tmp_path / "odd.mp4", clip[:3, :31, :29], fps=FPS))
    assert frames.shape == (3, 31, 29, 3)


@pytest.mark.parametrize("suffix, tol", [(".wav", 1e-3), (".flac", 1e-3), (".ogg", 0.05)])
def test_audio_round_trip(tmp_path, suffix, tol):
    w = wave()
    out = read_audio(write_audio(tmp_path / f"a{suffix}", w, 16000), 16000)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert (out - w).abs().max() < tol


def test_audio_resample_and_mono_mix(tmp_path):
    stereo = torch.stack([wave(freq=440.0), wave(freq=440.0) * 0.5])
    path = write_audio(tmp_path / "s.wav", stereo, 16000)
    mono = read_audio(path)  # native rate
    assert mono.shape == (8000,) and torch.allclose(mono, 0.75 * wave(), atol=1e-3)
    down = read_audio(path, 8000)
    assert down.shape == (4000,)
    spectrum = torch.fft.rfft(down).abs()
    assert abs(spectrum.argmax().item() * 8000 / 4000 - 440) <= 2  # pitch kept


def test_write_replaces_existing_file_atomically(tmp_path, clip):
    path = tmp_path / "x.wav"
    write_audio(path, wave(0.1), 16000)
    write_audio(path, wave(0.2), 16000)
    assert read_audio(path).shape == (3200,)
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", clip.float(), fps=FPS)  # wrong dtype: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]


# ---------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------


def _good_bytes(kind: str, tmp: Path, clip: torch.Tensor) -> bytes:
    image = clip[0].permute(2, 0, 1).contiguous()
    if kind == "png":
        return bytes(encode_png(image).numpy())
    if kind == "jpg":
        return bytes(encode_jpeg(image).numpy())
    if kind in ("mp4", "gif"):
        return write_video(tmp / f"good.{kind}", clip, fps=FPS).read_bytes()
    return write_audio(tmp / f"good.{kind}", wave(), 16000).read_bytes()


def _bad_bytes(case: str, good: bytes) -> bytes:
    if case == "empty":
        return b""
    if case == "truncated":
        return good[: len(good) // 2]
    if case == "wrong_format":
        return b"this is a text file, not media\n" * 4
    # undecodable: the right magic bytes, then garbage
    rng = np.random.default_rng(0)
    return good[:16] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()


READERS = {
    "png": read_image, "jpg": read_image,
    "mp4": read_video, "gif": read_video,
    "wav": read_audio, "flac": read_audio,
}


@pytest.mark.parametrize("kind", sorted(READERS))
@pytest.mark.parametrize("case", ["empty", "truncated", "wrong_format", "undecodable"])
def test_bad_files_raise_media_decode_error_naming_the_file(tmp_path, clip, kind, case):
    path = tmp_path / f"bad_{case}.{kind}"
    path.write_bytes(_bad_bytes(case, _good_bytes(kind, tmp_path, clip)))
    with pytest.raises(MediaDecodeError) as err:
        READERS[kind](path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("reader", [read_image, read_video, read_audio])
def test_missing_file_and_directory_raise_media_decode_error(tmp_path, reader):
    with pytest.raises(MediaDecodeError, match="missing"):
        reader(tmp_path / "missing")
    with pytest.raises(MediaDecodeError, match="not a regular file"):
        reader(tmp_path)


def test_video_module_imports_without_pyav(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match="pip install av"):
        read_video(tmp_path / "x.mp4")
