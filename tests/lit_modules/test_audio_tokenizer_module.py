"""The audio tokenizer LightningModule: it learns, its checkpoints load frozen, its tokens cache."""

from __future__ import annotations

from pathlib import Path

import torch

import train
from datamodules.tokens import TokenDataModule
from lit_modules.audio_tokenizer import load_audio_tokenizer
from tests.conftest import compose_train_cfg
from tools.tokenize_dataset import tokenize

QUIET = ["~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "extras.print_config=false", "logger=csv"]


def audio_cfg(tmp_path: Path, *extra: str):
    return compose_train_cfg(["experiment=audio_tokenizer", "model.net.preset=tiny", "data.num_clips=8",
                              "data.clip_seconds=0.5", "data.batch_size=2", *QUIET, *extra], tmp_path / "run")


def test_overfitting_two_clips_drives_mel_error_down(tmp_path):
    # One batch of two clips (a tone and a chord). The untrained codec's normalised log-mel L1 is
    # ~1.5 (the scale of the data itself); 0.35 means the spectral envelope of both clips is reproduced
    # through 2 codebooks of 64 codes, which a dead quantizer (one code used) cannot do.
    cfg = audio_cfg(tmp_path, "data.num_clips=4", "data.val_fraction=0.5", "trainer.max_steps=80",
                    "trainer.limit_val_batches=0", "test=false", "model.optim.warmup_steps=10",
                    "~callbacks.model_checkpoint")
    _, objects = train.run(cfg)
    model, dm = objects["model"], objects["datamodule"]
    batch = next(iter(dm.train_dataloader()))
    model.net.eval()
    with torch.no_grad():
        codes = model.net.encode(batch.waveform)
        l1 = (model.net.decode(codes) - model.net.log_mel(batch.waveform)).abs().mean().item()
    print(f"overfit mel L1 {l1:.3f}")
    assert l1 < 0.35, l1


def test_checkpoint_round_trip_and_audio_token_cache(tmp_path):
    cfg = audio_cfg(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1")
    metrics, objects = train.run(cfg)
    assert {"val/mel_l1_levels_2", "val/perplexity_level_1", "test/mel_snr_db"} <= set(metrics)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    tok = load_audio_tokenizer(str(ckpt))
    wave = torch.rand(2, 8000) * 2 - 1
    net = objects["model"].net.eval()
    assert torch.equal(net.encode(wave), tok.encode(wave))

    cache = tmp_path / "cache"
    summary = tokenize(str(ckpt), str(cache), ["experiment=audio_tokenizer", "data.num_clips=8",
                                              "data.clip_seconds=0.5"], shard_size=4)
    assert summary["train"]["items"] > 0
    dm = TokenDataModule(str(cache), str(ckpt), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.tokens[0].shape[0] == 2 and batch.tokens[0].shape[-1] == tok.cfg.num_quantizers
    assert batch.features is None
