"""Shared fixtures: compose Hydra configs the way train.py does, into a temporary run dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from lit_modules.schemas import register_schemas  # noqa: E402

register_schemas()

# A small, fast configuration used by most end-to-end tests.
TINY = [
    "experiment=lm_tiny",
    "data.num_people=40",
    "data.batch_size=8",
    "data.seq_len=32",
    "~callbacks.rich_progress_bar",
    "~callbacks.model_summary",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "extras.print_config=false",
    "model.sample.max_new_tokens=8",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _untrained_export(tmp_path_factory, kind: str, tokenizer, cfg, name: str) -> Path:
    """Save an untrained media tokenizer (built with seed 0) as a tokenizer export file."""
    from models.tokenizers.checkpoint import save_tokenizer_export

    path = tmp_path_factory.mktemp("tok") / name
    save_tokenizer_export(path, tokenizer, kind, cfg.to_dict())
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """An untrained tiny video tokenizer export (16x16 frames, time stride 2, scales 1/2/4)."""
    from models.tokenizers.visual import TokenizerConfig, VisualTokenizer

    torch.manual_seed(0)
    cfg = TokenizerConfig(preset="tiny")
    return _untrained_export(tmp_path_factory, "visual", VisualTokenizer(cfg), cfg, "tiny_video_tokenizer.pt")


@pytest.fixture(scope="session")
def tiny_audio_tokenizer(tmp_path_factory) -> Path:
    """An untrained tiny audio tokenizer export (2 RVQ levels of 64 codes, 50 frames/s)."""
    from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig

    torch.manual_seed(0)
    cfg = AudioTokenizerConfig(preset="tiny")
    return _untrained_export(tmp_path_factory, "audio", AudioTokenizer(cfg), cfg, "tiny_audio_tokenizer.pt")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session (BPE is trained once)."""
    return tmp_path_factory.mktemp("data_cache")


def compose_train_cfg(overrides: list[str], output_dir: Path, cache_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml like `python train.py <overrides>`, writing under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
        if cache_dir is not None:
            cfg.data.cache_dir = str(cache_dir)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path, data_cache):
    def make(overrides: list[str] = (), tiny: bool = True, subdir: str = "run") -> DictConfig:
        base = list(TINY) if tiny else []
        return compose_train_cfg(base + list(overrides), tmp_path / subdir, data_cache)

    return make
