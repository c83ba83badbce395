"""The course's log-mel front end, in plain PyTorch (no torchaudio).

SPEC section 3: power STFT (n_fft 400, hop 160, periodic Hann window, centered with reflect padding)
-> Slaney-scale mel filterbank with Slaney area normalization, 80 bins, built for 16,000 Hz
-> ``log10(clamp(x, 1e-10))`` -> ``max(x, x.max() - 8)`` (per clip) -> ``(x + 4) / 4``
-> right-pad with zeros and crop to 2754 frames.

Course quirk: the filterbank was built for 16,000 Hz while LJ Speech is 22,050 Hz, so the 201 STFT bins
(55.1 Hz apart) are read as if they were 40 Hz apart: mel bin edges land at 22050/16000 = 1.38x the
intended frequencies and the band 8-11 kHz is never seen. ``filterbank_rate=16000`` (default) keeps the
course behaviour; ``filterbank_rate=None`` builds the filterbank for the audio's own rate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["hz_to_mel", "mel_to_hz", "mel_filterbank", "FrontEndConfig", "LogMelFrontEnd"]

# Slaney (Auditory Toolbox) mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mel
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (same as librosa ``htk=False`` and torchaudio ``mel_scale="slaney"``)."""
    f = torch.as_tensor(f, dtype=torch.float64)
    lin = f / _F_SP
    log = _MIN_LOG_MEL + torch.log(torch.clamp(f, min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return torch.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    lin = m * _F_SP
    log = _MIN_LOG_HZ * torch.exp(_LOG_STEP * (m - _MIN_LOG_MEL))
    return torch.where(m >= _MIN_LOG_MEL, log, lin)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: float, f_min: float = 0.0, f_max: Optional[float] = None) -> torch.Tensor:
    """Triangular Slaney-scale filters with Slaney (area) normalization: ``[n_fft // 2 + 1, n_mels]`` float32.

    Filter ``m`` rises from mel point ``m`` to ``m + 1`` and falls to ``m + 2`` (``n_mels + 2`` points evenly
    spaced in mel between ``f_min`` and ``f_max``, default ``sample_rate / 2``) and is scaled by
    ``2 / (f[m + 2] - f[m])`` so every filter has the same area. Computed in float64.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    pts = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64))
    widths = pts[1:] - pts[:-1]  # [n_mels + 1]
    rel = pts[None, :] - freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -rel[:, :-2] / widths[:-1]
    falling = rel[:, 2:] / widths[1:]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    fb = fb * (2.0 / (pts[2:] - pts[:-2]))[None, :]
    return fb.to(torch.float32)


@dataclass(frozen=True)
class FrontEndConfig:
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    filterbank_rate: Optional[int] = 16000  # None: the audio's own sample rate (fixes the course quirk)
    max_frames: int = 2754
    floor_db: float = 8.0  # dynamic range kept below the clip's maximum, in log10 units (8 = 80 dB)

    def as_dict(self) -> dict:
        return asdict(self)


class LogMelFrontEnd:
    """``features(wave [T] float, sample_rate) -> [n_mels, frames]`` (unpadded); ``pad`` pads/crops.

    ``frames = 1 + T // hop_length`` (centered STFT).
    """

    def __init__(self, config: FrontEndConfig = FrontEndConfig()) -> None:
        self.config = config
        self._window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float32)
        self._filterbanks: dict = {}

    def filterbank(self, sample_rate: int) -> torch.Tensor:
        rate = self.config.filterbank_rate or sample_rate
        if rate not in self._filterbanks:
            self._filterbanks[rate] = mel_filterbank(self.config.n_fft, self.config.n_mels, rate)
        return self._filterbanks[rate]

    def power_spectrogram(self, wave: torch.Tensor) -> torch.Tensor:
        """``|STFT|^2``: ``[T] -> [n_fft // 2 + 1, frames]``."""
        c = self.config
        window = self._window.to(wave.device)
        spec = torch.stft(
            wave, c.n_fft, hop_length=c.hop_length, win_length=c.n_fft, window=window,
            center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        )
        return spec.abs().pow(2)

    def features(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        if wave.dim() != 1:
            raise ValueError(f"wave must be a 1-D (mono) tensor, got shape {tuple(wave.shape)}")
        wave = wave.to(torch.float32)
        power = self.power_spectrogram(wave)
        mel = self.filterbank(sample_rate).to(wave.device).T @ power  # [n_mels, frames]
        log = torch.clamp(mel, min=1e-10).log10()
        log = torch.maximum(log, log.max() - self.config.floor_db)
        return (log + 4.0) / 4.0

    def pad(self, feats: torch.Tensor) -> torch.Tensor:
        """Right-pad with zeros and crop to ``max_frames``: ``[n_mels, frames] -> [n_mels, max_frames]``."""
        n = self.config.max_frames
        feats = feats[:, :n]
        return torch.nn.functional.pad(feats, (0, n - feats.shape[1]))

    def __call__(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        return self.pad(self.features(wave, sample_rate))
