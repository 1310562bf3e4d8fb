"""Deterministic synthetic sound clips in five classes: tone, chord, chirp, clicks, noise burst.

Classes (label: name):
    0 tone         one pitch (150-1500 Hz) with a few random harmonics and light vibrato
    1 chord        3-4 notes of a major or minor triad (+ 7th or octave) on a 110-440 Hz root
    2 chirp        exponential pitch sweep up or down, over at least one octave (200-4000 Hz), across the note
    3 clicks       a regular train of short damped-sine clicks at 2-8 per second (>= 3 per note)
    4 noise_burst  band-passed white noise (centre 300-6000 Hz, 1-3 octaves wide)

Pitches, tempos, timings and ADSR envelopes (attack, decay, sustain level, release) are random per
clip; every clip is peak-normalised to a random peak in [0.5, 0.9]. Clip i is drawn from a
generator seeded with (seed, i), so it does not depend on `num_clips`; labels are balanced (each
block of `num_classes` consecutive clips holds every class once). `audio_params(...)` (or
`render_synthetic_audio(..., return_params=True)`) gives the parameters each clip was drawn with.

Voices (`voices=N` > 0; 0 renders exactly the clips above): a fixed bank of N "speakers", each a
timbre applied to whatever its clips play: a spectral tilt (+-4 dB per octave), a formant (a
Gaussian boost in log-frequency, +12 dB around a centre log-spaced over 400-4000 Hz) and, for odd
voices, a tremolo. Clip i's voice is drawn from its own generator (seed, 2, i), so the content draws
are unchanged; `voice_params(v, N)` gives voice v's parameters and the clip params record "voice".
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["AUDIO_CLASSES", "apply_voice", "audio_params", "render_synthetic_audio", "voice_params"]

AUDIO_CLASSES = ("tone", "chord", "chirp", "clicks", "noise_burst")


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _adsr(rng: np.random.Generator, n: int, sr: int) -> tuple[np.ndarray, float, float]:
    """A piecewise-linear ADSR envelope over [0, n) samples (one note), its onset and release time (s)."""
    dur = n / sr
    onset = rng.uniform(0.0, 0.15) * dur
    length = rng.uniform(0.5, 0.85) * dur
    attack = rng.uniform(0.005, 0.08)
    decay = rng.uniform(0.02, 0.2)
    sustain = rng.uniform(0.3, 0.9)
    release = rng.uniform(0.02, 0.3)
    # Short notes: shrink attack/decay so the release still starts after them.
    ad = min(attack + decay, 0.8 * length)
    attack, decay = attack * ad / (attack + decay), decay * ad / (attack + decay)
    off = onset + length
    xs = [0.0, onset, onset + attack, onset + attack + decay, off, off + release, max(dur, off + release) + 1.0]
    ys = [0.0, 0.0, 1.0, sustain, sustain, 0.0, 0.0]
    return np.interp(np.arange(n) / sr, xs, ys), onset, off


def _tone(rng: np.random.Generator, t: np.ndarray, sr: int, note: tuple[float, float],
          info: dict | None = None) -> np.ndarray:
    f0 = min(_log_uniform(rng, 150.0, 1500.0), 0.2 * sr)
    vib_rate, vib_depth = rng.uniform(3.0, 7.0), rng.uniform(0.0, 0.006)
    # Vibrato as phase modulation: the instantaneous frequency swings by +-vib_depth * f0.
    phase = 2 * math.pi * f0 * t + (vib_depth * f0 / vib_rate) * np.sin(2 * math.pi * vib_rate * t)
    out = np.sin(phase + rng.uniform(0, 2 * math.pi))
    harmonics = []  # (harmonic number, relative amplitude) of the harmonics actually added
    for h in range(2, 5):
        amp = rng.uniform(0.0, 0.6) / h
        if h * f0 < 0.45 * sr:
            out = out + amp * np.sin(h * phase + rng.uniform(0, 2 * math.pi))
            harmonics.append((h, float(amp)))
    if info is not None:
        info.update(frequency=float(f0), vibrato_rate=float(vib_rate), vibrato_depth=float(vib_depth),
                    harmonics=harmonics)
    return out


def _chord(rng: np.random.Generator, t: np.ndarray, sr: int, note: tuple[float, float],
           info: dict | None = None) -> np.ndarray:
    root = _log_uniform(rng, 110.0, 440.0)
    third = 4 if rng.random() < 0.5 else 3
    extra = [None, 10, 11, 12][int(rng.integers(0, 4))]
    steps = [0, third, 7] + ([extra] if extra is not None else [])
    out = np.zeros_like(t)
    played = []
    for s in steps:
        f = root * 2.0 ** (s / 12.0)
        if f >= 0.45 * sr:
            continue
        played.append(float(f))
        ph = rng.uniform(0, 2 * math.pi)
        out = out + np.sin(2 * math.pi * f * t + ph)
        if 2 * f < 0.45 * sr:
            out = out + 0.3 * np.sin(4 * math.pi * f * t + ph)
    if info is not None:
        info.update(root=float(root), third=third, extra=extra, steps=steps, frequencies=played)
    return out


def _chirp(rng: np.random.Generator, t: np.ndarray, sr: int, note: tuple[float, float],
           info: dict | None = None) -> np.ndarray:
    top = min(4000.0, 0.4 * sr)
    f0 = _log_uniform(rng, 200.0, top / 2.0)
    f1 = _log_uniform(rng, 2.0 * f0, top)
    if rng.random() < 0.5:
        f0, f1 = f1, f0
    # The sweep spans the note's sustain (onset to release), so all of it is audible; the pitch
    # holds at f0 before and at f1 after.
    start, stop = note
    dur = max(stop - start, 1.0 / sr)
    k = math.log(f1 / f0)
    u = np.clip(t - start, 0.0, dur)
    # Phase of an exponential sweep f(u) = f0 * (f1/f0)^(u/dur): the integral of 2 pi f, plus the
    # constant-pitch parts outside the sweep.
    phase = 2 * math.pi * (f0 * dur * (np.exp(k * u / dur) - 1.0) / k
                           + f0 * np.minimum(t - start, 0.0) + f1 * np.maximum(t - start - dur, 0.0))
    if info is not None:
        info.update(start_frequency=float(f0), end_frequency=float(f1), sweep_start=float(start),
                    sweep_duration=float(dur))
    return np.sin(phase)


def _clicks(rng: np.random.Generator, t: np.ndarray, sr: int, note: tuple[float, float],
            info: dict | None = None) -> np.ndarray:
    # At least ~3 clicks fall inside the note, so the rhythm is audible even in a short one.
    span = max(note[1] - note[0], 1e-3)
    rate = rng.uniform(max(2.0, 3.0 / span), max(8.0, 3.0 / span))
    freq = min(rng.uniform(1500.0, 4000.0), 0.4 * sr)
    tau = rng.uniform(0.002, 0.008)
    start = note[0] + rng.uniform(0.0, 0.25 / rate)  # the train starts with the note
    out = np.zeros_like(t)
    n = len(t)
    width = min(n, int(6 * tau * sr) + 1)
    kernel = np.exp(-np.arange(width) / (tau * sr)) * np.sin(2 * math.pi * freq * np.arange(width) / sr)
    onset = start
    dur = n / sr
    onsets = []
    while onset < dur:
        onsets.append(float(onset))
        i = int(onset * sr)
        gain = rng.uniform(0.8, 1.2)
        m = min(width, n - i)
        out[i : i + m] += gain * kernel[:m]
        onset += (1.0 / rate) * rng.uniform(0.97, 1.03)  # slight timing jitter, still clearly periodic
    if info is not None:
        info.update(rate=float(rate), click_frequency=float(freq), decay=float(tau), onsets=onsets)
    return out


def _noise_burst(rng: np.random.Generator, t: np.ndarray, sr: int, note: tuple[float, float],
                 info: dict | None = None) -> np.ndarray:
    n = len(t)
    noise = rng.standard_normal(n)
    centre = min(_log_uniform(rng, 300.0, 6000.0), 0.35 * sr)
    width = rng.uniform(1.0, 3.0)  # octaves
    spec = np.fft.rfft(noise)
    f = np.fft.rfftfreq(n, 1.0 / sr)
    octaves = np.log2(np.maximum(f, 1.0) / centre)
    # Smooth (Gaussian in log-frequency) band, so there is no ringing from a brick-wall filter.
    spec *= np.exp(-0.5 * (octaves / (width / 2.0)) ** 2)
    if info is not None:
        info.update(centre=float(centre), width_octaves=float(width))
    return np.fft.irfft(spec, n)


_RENDERERS = (_tone, _chord, _chirp, _clicks, _noise_burst)


def voice_params(voice: int, voices: int) -> dict:
    """Voice `voice` of a bank of `voices`: formant centre (Hz) log-spaced over 400-4000 Hz, tilt
    alternating -4 / +4 dB per octave (pairs of neighbours differ in both), tremolo on odd voices."""
    if not 0 <= voice < voices:
        raise ValueError(f"voice {voice} is not in [0, {voices})")
    return {"voice": int(voice), "formant": 400.0 * 10.0 ** ((voice + 0.5) / voices), "formant_gain_db": 12.0,
            "formant_octaves": 0.5, "tilt_db_per_octave": 4.0 if voice % 2 else -4.0,
            "tremolo_hz": 6.0 + 2.0 * (voice // 2 % 3) if voice % 2 else 0.0, "tremolo_depth": 0.6}


def apply_voice(x: np.ndarray, sr: int, vp: dict) -> np.ndarray:
    """A clip [L] as voice `vp` (`voice_params`) says it: tilt and formant as one zero-phase spectral
    gain, then the tremolo."""
    n = len(x)
    f = np.fft.rfftfreq(n, 1.0 / sr)
    octaves = np.log2(np.maximum(f, 50.0) / 1000.0)
    gain_db = vp["tilt_db_per_octave"] * octaves + vp["formant_gain_db"] * np.exp(
        -0.5 * (np.log2(np.maximum(f, 1.0) / vp["formant"]) / vp["formant_octaves"]) ** 2)
    y = np.fft.irfft(np.fft.rfft(x) * 10.0 ** (gain_db / 20.0), n)
    if vp["tremolo_hz"] > 0:
        t = np.arange(n) / sr
        y = y * (1.0 - vp["tremolo_depth"] * 0.5 * (1.0 - np.cos(2 * math.pi * vp["tremolo_hz"] * t)))
    return y


def render_synthetic_audio(
    num_clips: int,
    seconds: float,
    sample_rate: int = 16000,
    seed: int = 0,
    num_classes: int | None = None,
    return_params: bool = False,
    voices: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]] | tuple[torch.Tensor, torch.Tensor, list[str], list[dict]]:
    """Waveforms float32 [N, L] in [-1, 1], labels int64 [N] and the class names.

    L = round(seconds * sample_rate). num_classes: use only the first k classes (default: all 5).
    return_params: also return one dict per clip with the parameters it was drawn with (recorded
    while rendering, so the waveforms are the same either way): "kind", "label", "seconds",
    "sample_rate", "onset" / "release" (note start / release start, s), "peak", and per kind
    tone: "frequency", "vibrato_rate", "vibrato_depth", "harmonics" [(h, amp)];
    chord: "root", "third" (4 major / 3 minor semitones), "extra" (None, 10, 11 or 12 semitones),
    "steps", "frequencies" (notes played); chirp: "start_frequency", "end_frequency",
    "sweep_start", "sweep_duration"; clicks: "rate" (per s), "click_frequency", "decay", "onsets";
    noise_burst: "centre" (Hz), "width_octaves"; with `voices` > 0 also "voice" (module docstring).
    """
    k = len(AUDIO_CLASSES) if num_classes is None else int(num_classes)
    if not 1 <= k <= len(AUDIO_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(AUDIO_CLASSES)}], got {num_classes}")
    if voices < 0:
        raise ValueError(f"voices must be >= 0, got {voices}")
    if num_clips < 0 or seconds <= 0 or sample_rate < 1000:
        raise ValueError(f"need num_clips >= 0, seconds > 0, sample_rate >= 1000; got "
                         f"{num_clips}, {seconds}, {sample_rate}")
    n = int(round(seconds * sample_rate))
    if n < 1:
        raise ValueError(f"seconds * sample_rate = {seconds * sample_rate} gives no samples")
    labels = np.empty(num_clips, dtype=np.int64)
    for block in range(-(-num_clips // k)):
        perm = np.random.default_rng([seed, 1, block]).permutation(k)
        labels[block * k : (block + 1) * k] = perm[: num_clips - block * k]
    t = np.arange(n) / sample_rate
    waves = np.zeros((num_clips, n), dtype=np.float32)
    params: list[dict] = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, 0, i])
        env, onset, release = _adsr(rng, n, sample_rate)
        info = {"kind": AUDIO_CLASSES[labels[i]], "label": int(labels[i]), "seconds": n / sample_rate,
                "sample_rate": int(sample_rate), "onset": float(onset), "release": float(release)}
        x = _RENDERERS[labels[i]](rng, t, sample_rate, (onset, release), info) * env
        if voices:
            info["voice"] = int(np.random.default_rng([seed, 2, i]).integers(voices))
            x = apply_voice(x, sample_rate, voice_params(info["voice"], voices))
        peak = float(np.max(np.abs(x)))
        info["peak"] = 0.0
        if peak > 0:
            info["peak"] = float(rng.uniform(0.5, 0.9))
            x = x * (info["peak"] / peak)
        waves[i] = x
        params.append(info)
    if return_params:
        return torch.from_numpy(waves), torch.from_numpy(labels), list(AUDIO_CLASSES[:k]), params
    return torch.from_numpy(waves), torch.from_numpy(labels), list(AUDIO_CLASSES[:k])


def audio_params(num_clips: int, seconds: float, sample_rate: int = 16000, seed: int = 0,
                 num_classes: int | None = None, voices: int = 0) -> list[dict]:
    """The per-clip parameters `render_synthetic_audio` draws for the same arguments (see its
    `return_params`). Renders the clips to get them, since some draws are interleaved with synthesis."""
    return render_synthetic_audio(num_clips, seconds, sample_rate, seed, num_classes, return_params=True,
                                  voices=voices)[3]
