"""Image, video and audio decoders/encoders with one error type for every unusable file.

Each `read_*` raises `MediaDecodeError` (a ValueError) whose message starts with the file path for a
missing, unreadable, empty, truncated, wrong-format or undecodable file. Video needs PyAV (`av`)
and audio `soundfile`; both are imported inside the functions, so this module imports without them.
Writers go through a temporary file in the target directory and `os.replace`, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

from fractions import Fraction
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.io import atomic_write

__all__ = [
    "AUDIO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MediaDecodeError",
    "VIDEO_SUFFIXES",
    "audio_num_samples",
    "read_audio",
    "read_image",
    "read_video",
    "video_frame_count",
    "write_audio",
    "write_video",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".gif", ".mkv", ".mov")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class MediaDecodeError(ValueError):
    """A media file that cannot be used; the message names the file."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    # torchvision's C++ errors put the source location first and the reason last.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _check_file(path: Path) -> int:
    """Size in bytes of an existing, non-empty regular file; MediaDecodeError otherwise."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MediaDecodeError(f"{path}: cannot read ({e.strerror or e})") from e
    if not path.is_file():
        raise MediaDecodeError(f"{path}: not a regular file")
    if size == 0:
        raise MediaDecodeError(f"{path}: empty file")
    return size


def _read_head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise MediaDecodeError(f"{path}: cannot read ({e.strerror or e})") from e


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode a png / jpeg / webp file to uint8 [3, H, W] RGB (grayscale and alpha are converted)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    path = Path(path)
    size = _check_file(path)
    data = _read_head(path, size)
    if len(data) < size:
        raise MediaDecodeError(f"{path}: file shrank while reading")
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, TypeError) as e:
        raise MediaDecodeError(f"{path}: not a decodable image ({_first_line(e)})") from e
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = to_dtype(img, torch.uint8, scale=True)
    if img.dim() == 4:  # an animated image decodes to [N, C, H, W]: keep the first frame
        img = img[0]
    if img.dim() != 3 or img.shape[1] == 0 or img.shape[2] == 0:
        raise MediaDecodeError(f"{path}: decoded to an unexpected shape {tuple(img.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] == 4:
        img = img[:3]
    return img.contiguous()


# ---------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("video decoding needs PyAV: pip install av") from e
    return av


def _video_stream(container, path: Path) -> tuple[Any, float | None, float]:
    """(the first video stream, its native fps or None, one frame's duration in seconds: 1/25 when the
    rate is unknown); MediaDecodeError when the container has no video stream."""
    if not container.streams.video:
        raise MediaDecodeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    native_fps = float(rate) if rate else None
    return stream, native_fps, 1.0 / native_fps if native_fps else 1.0 / 25.0


def video_frame_count(path: Path, fps: float | None, frame_stride: int) -> int:
    """Frames `read_video(path, None, fps, frame_stride)` returns, from the container's packets (their
    count and timestamps; nothing is decoded). MediaDecodeError for a file that cannot be opened.

    A file whose frames turn out fewer than counted is found bad when a clip past its end is loaded.
    Packets without a timestamp (with fps resampling) fall back to decoding the file.
    """
    av = _import_av()
    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path), mode="r") as container:
            stream, _, frame_dur = _video_stream(container, path)
            time_base = stream.time_base
            pts = [packet.pts for packet in container.demux(stream) if packet.size > 0]
    except MediaDecodeError:
        raise
    except (av.FFmpegError, ValueError, RuntimeError, OSError, EOFError) as e:
        raise MediaDecodeError(f"{path}: not a decodable video ({e})") from e
    if not pts:
        raise MediaDecodeError(f"{path}: no video frames")
    if fps is None:
        return (len(pts) - 1) // frame_stride + 1
    if time_base is None or any(t is None for t in pts):
        return read_video(path, None, fps=fps, stride=frame_stride)[0].shape[0]
    times = sorted(float(t * time_base) for t in pts)
    # read_video's resampled length: output times t0 + k / fps up to the end of the last frame
    return max(1, int(math.floor((times[-1] + frame_dur - times[0]) * fps - 1e-6)) + 1)


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    stride: int = 1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode frames of the first video stream to uint8 [T, H, W, 3] RGB, plus an info dict.

    fps: resample to this frame rate by timestamps (each output time takes the frame on screen at
    that time, so frames repeat when upsampling and are dropped when downsampling); None keeps
    every `stride`-th decoded frame. The first `num_frames` sampled frames are returned (all when
    None); a shorter video gives fewer. info: native_fps, num_decoded, width, height, codec and
    times (seconds of the returned frames).
    A video decoded to its end that holds clearly fewer frames, or ends clearly earlier, than its
    container declares is reported as truncated.
    """
    av = _import_av()
    path = Path(path)
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    size = _check_file(path)
    if path.suffix.lower() == ".gif":
        # FFmpeg decodes a cut GIF without complaint; a complete one ends with the 0x3B trailer.
        with open(path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\x3b":
                raise MediaDecodeError(f"{path}: truncated GIF (no trailer byte)")

    times: list[float] = []
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            stream, native_fps, frame_dur = _video_stream(container, path)
            # With fps resampling, decoding can stop once a frame starts after the last wanted time.
            stop_time = None
            reached_end = True
            index = 0
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else index * frame_dur
                if fps is not None:
                    if stop_time is None and num_frames is not None:
                        stop_time = t + (num_frames - 1) / fps
                    if stop_time is not None and t > stop_time + 1e-6:
                        reached_end = False
                        break
                    times.append(t)
                    frames.append(frame.to_ndarray(format="rgb24"))
                else:
                    if index % stride == 0:
                        times.append(t)
                        frames.append(frame.to_ndarray(format="rgb24"))
                        if num_frames is not None and len(frames) >= num_frames:
                            index += 1
                            reached_end = False
                            break
                index += 1
            num_decoded = index
            if not frames:
                raise MediaDecodeError(f"{path}: no decodable video frames")
            if reached_end:
                declared = stream.frames or 0
                if declared and num_decoded + max(2, 0.05 * declared) < declared:
                    raise MediaDecodeError(
                        f"{path}: truncated video (decoded {num_decoded} of {declared} frames)")
                expected = None
                if stream.duration and stream.time_base:
                    expected = float(stream.duration * stream.time_base)
                elif container.duration and not container.streams.audio:
                    expected = container.duration / 1e6
                end = times[-1] + frame_dur
                if expected and end < 0.8 * expected - 2 * frame_dur:
                    raise MediaDecodeError(
                        f"{path}: truncated video (frames end at {end:.2f}s of {expected:.2f}s)")
            codec = stream.codec_context.name
    except MediaDecodeError:
        raise
    except (av.FFmpegError, ValueError, RuntimeError, OSError, EOFError) as e:
        raise MediaDecodeError(f"{path}: not a decodable video ({_first_line(e)})") from e

    if fps is not None:
        # Output time k is times[0] + k / fps; it shows the last frame that started at or before it.
        t0, end = times[0], times[-1] + frame_dur
        count = max(1, int(np.floor((end - t0) * fps - 1e-6)) + 1)
        if num_frames is not None:
            count = min(count, num_frames)
        targets = t0 + np.arange(count) / fps
        idx = np.searchsorted(np.asarray(times), targets + 1e-6, side="right") - 1
        idx = np.clip(idx, 0, len(frames) - 1)
        frames = [frames[i] for i in idx]
        times = [float(x) for x in targets]
    if len({f.shape for f in frames}) != 1:
        raise MediaDecodeError(f"{path}: frame size changes inside the video")
    video = torch.from_numpy(np.stack(frames))
    info = {
        "native_fps": native_fps,
        "num_decoded": num_decoded,
        "width": int(video.shape[2]),
        "height": int(video.shape[1]),
        "codec": codec,
        "times": times,
    }
    return video, info


_VIDEO_FORMATS = {
    # suffix: (container format, codec preference)
    ".mp4": ("mp4", ("libx264", "h264", "mpeg4")),
    ".mkv": ("matroska", ("libx264", "h264", "mpeg4")),
    ".mov": ("mov", ("libx264", "h264", "mpeg4")),
    ".webm": ("webm", ("libvpx-vp9", "libvpx")),
    ".avi": ("avi", ("mpeg4", "mjpeg")),
    ".gif": ("gif", ("gif",)),
}


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: float,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode uint8 [T, H, W, 3] RGB frames; the format follows the suffix (mp4, mkv, mov, webm, avi, gif).

    mp4/mkv/mov use H.264 (libx264, crf 18 unless `options` say otherwise) when available, else
    MPEG-4 part 2; webm VP9; avi MPEG-4; gif a 256-colour (rgb8) palette.
    """
    av = _import_av()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _VIDEO_FORMATS:
        raise ValueError(f"{path}: unsupported video suffix (expected one of {sorted(_VIDEO_FORMATS)})")
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {arr.dtype} {arr.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    fmt, codecs = _VIDEO_FORMATS[suffix]
    codec = next((c for c in codecs if c in av.codecs_available), None)
    if codec is None:
        raise RuntimeError(f"no encoder for {suffix} in this PyAV build (tried {', '.join(codecs)})")
    _, h, w, _ = arr.shape
    if codec == "gif":
        pix_fmt = "rgb8"
    elif h % 2 or w % 2:
        # 4:2:0 needs even sizes; 4:4:4 keeps odd ones (H.264 only).
        if codec not in ("libx264", "h264"):
            raise ValueError(f"{path}: {codec} needs an even frame size, got {w}x{h}")
        pix_fmt = "yuv444p"
    else:
        pix_fmt = "yuv420p"
    opts = dict(options or {})
    if codec in ("libx264", "h264"):
        opts.setdefault("crf", "18")
    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format=fmt) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            if opts:
                stream.options = opts
            for img in arr:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    # the temporary file keeps the suffix: tools that sniff the format by name still work
    return atomic_write(path, write, keep_suffix=True)


# ---------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------


def _import_soundfile():
    try:
        import soundfile
    except ImportError as e:  # also raised when the libsndfile shared library is missing
        raise ImportError("audio decoding needs soundfile: pip install soundfile") from e
    return soundfile


def _check_wav_header(path: Path, size: int) -> None:
    """libsndfile reads a cut WAV silently; compare the data chunk's declared size with the file."""
    head = _read_head(path, 1 << 16)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return  # not RIFF/WAVE (RF64, or not a WAV at all): left to libsndfile
    pos = 12
    while pos + 8 <= len(head):
        chunk, n = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            # 0 and 0xFFFFFFFF mark "unknown size" (streamed writers); nothing to compare then.
            if n not in (0, 0xFFFFFFFF) and pos + 8 + n > size:
                raise MediaDecodeError(
                    f"{path}: truncated WAV (data chunk declares {n} bytes, file has {size - pos - 8})")
            return
        pos += 8 + n + (n & 1)


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> torch.Tensor:
    """Decode wav / flac / ogg to mono float32 [L] (channels averaged), resampled to `sample_rate`.

    sample_rate None keeps the file's rate.
    """
    sf = _import_soundfile()
    path = Path(path)
    size = _check_file(path)
    if path.suffix.lower() == ".wav":
        _check_wav_header(path, size)
    try:
        with sf.SoundFile(str(path)) as f:
            declared, native_sr = f.frames, f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, OSError, TypeError) as e:
        raise MediaDecodeError(f"{path}: not a decodable audio file ({_first_line(e)})") from e
    if data.shape[0] == 0:
        raise MediaDecodeError(f"{path}: no audio samples")
    if data.shape[0] < declared:
        raise MediaDecodeError(f"{path}: truncated audio (read {data.shape[0]} of {declared} frames)")
    if not np.isfinite(data).all():
        raise MediaDecodeError(f"{path}: audio contains NaN or infinite samples")
    wave = torch.from_numpy(data.mean(axis=1, dtype=np.float32))
    if sample_rate is not None and sample_rate != native_sr:
        import torchaudio.functional as AF

        wave = AF.resample(wave, int(native_sr), int(sample_rate))
    return wave.contiguous()


def audio_num_samples(path: str | os.PathLike, sample_rate: int | None = None) -> int:
    """Samples `read_audio(path, sample_rate)` returns, from the file's header alone (nothing decoded).

    The resampled length is torchaudio's: ceil(frames * new / orig) with the rates reduced by their gcd.
    A file whose samples turn out shorter than its header says fails later, in `read_audio`.
    """
    sf = _import_soundfile()
    path = Path(path)
    _check_file(path)
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError, OSError, TypeError) as e:
        raise MediaDecodeError(f"{path}: not a decodable audio file ({_first_line(e)})") from e
    frames, native_sr = int(info.frames), int(info.samplerate)
    if frames <= 0:
        raise MediaDecodeError(f"{path}: no audio samples")
    if sample_rate is None or int(sample_rate) == native_sr:
        return frames
    gcd = math.gcd(native_sr, int(sample_rate))
    orig, new = native_sr // gcd, int(sample_rate) // gcd
    # the same float expression as torchaudio.functional.resample, so the lengths agree exactly
    return int(torch.ceil(torch.as_tensor(new * frames / orig)).long())


_AUDIO_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def write_audio(path: str | os.PathLike, wave: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write float samples in [-1, 1] ([L] mono or [C, L]) as wav / flac (16-bit PCM) or ogg (Vorbis)."""
    sf = _import_soundfile()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _AUDIO_FORMATS:
        raise ValueError(f"{path}: unsupported audio suffix (expected one of {sorted(_AUDIO_FORMATS)})")
    arr = wave.detach().cpu().float().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    if arr.ndim == 2:
        arr = arr.T  # [C, L] -> soundfile's [L, C]
    elif arr.ndim != 1:
        raise ValueError(f"wave must be [L] or [C, L], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("wave has no samples")
    arr = np.clip(arr, -1.0, 1.0)
    fmt, subtype = _AUDIO_FORMATS[suffix]
    return atomic_write(path, lambda tmp: sf.write(tmp, arr, int(sample_rate), format=fmt, subtype=subtype),
                        keep_suffix=True)
