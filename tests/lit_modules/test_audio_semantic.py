"""The audio tokenizer's semantic first code (papers.md 4.3): the frame-classifier teacher, the
distillation term (straight-through to the encoder, projection outside the export), a Hugging Face
Whisper encoder as the teacher (a tiny random one saved locally), and the level probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from lit_modules.audio_tokenizer import AudioTokenizerModule
from models.tokenizers.checkpoint import load_media_tokenizer
from models.tokenizers.semantic import AudioFrameClassifier, FrameClassifierConfig, load_teacher, pool_to
from tests.conftest import compose_train_cfg

QUIET = ["~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "extras.print_config=false", "logger=csv", "test=false"]
SMALL = ["data.num_clips=20", "data.batch_size=4", "data.clip_seconds=0.5", "trainer.limit_val_batches=1"]


def test_pool_to_averages_consecutive_frames():
    x = torch.arange(12.0).reshape(1, 6, 2)
    assert torch.equal(pool_to(x, 3), torch.tensor([[[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]]))
    assert torch.equal(pool_to(x, 6), x)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    cfg = compose_train_cfg(["experiment=audio_teacher", *SMALL, "trainer.max_steps=30", "trainer.val_check_interval=30", "model.net.channels=16",
                             "model.net.dim=16", *QUIET], out)
    metrics, _ = train.run(cfg)
    assert metrics["val/clip_acc"] >= 0.0
    return out / "checkpoints" / "last.ckpt"


def test_teacher_learns_the_sound_class_and_loads_frozen(teacher_ckpt):
    t = load_teacher(teacher_ckpt, expect_rate=16000)
    assert isinstance(t, AudioFrameClassifier) and not t.training and not any(p.requires_grad for p in t.parameters())
    wave = torch.randn(2, 8000) * 0.1
    feats = t.features(wave)
    assert feats.shape == (2, 51, 16) and t.dim == 16 and t.frame_rate == 100
    with pytest.raises(ValueError, match="takes 16000 Hz audio, the tokenizer 8000 Hz"):
        load_teacher(teacher_ckpt, expect_rate=8000)


def test_distillation_trains_the_first_level_towards_the_teacher(teacher_ckpt, tmp_path):
    cfg = compose_train_cfg(["experiment=audio_tokenizer_semantic", *SMALL, "model.net.preset=tiny",
                             f"model.semantic.teacher={teacher_ckpt}", "trainer.max_steps=3", "trainer.val_check_interval=3", *QUIET], tmp_path)
    metrics, objs = train.run(cfg)
    module: AudioTokenizerModule = objs["model"]
    assert "val/semantic_cos" in metrics and -1.0 <= metrics["val/semantic_cos"] <= 1.0
    # the term's gradient reaches the encoder (straight-through at level 1) and the projection, not the codebooks'
    # EMA (they follow the encoder) nor the decoder
    wave = next(iter(objs["datamodule"].train_dataloader())).waveform
    module.zero_grad(set_to_none=True)
    out = module.net(wave)
    (1 - module.semantic_cosine(wave, out)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.encoder.parameters())
    assert module.semantic_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.net.decoder.parameters())
    # the cosine is the hand-computed one: projected level-1 vectors against the pooled teacher features
    with torch.no_grad():
        t = module.teacher.features(wave)
        q1 = module.net.rvq.levels[0].lookup(out["codes"][..., 0])
        pred = module.semantic_proj(q1)
        target = pool_to(t, out["codes"].shape[1])
        want = torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()
        assert float(module.semantic_cosine(wave, out)) == pytest.approx(float(want), abs=1e-5)
    # the exported tokenizer is an ordinary one: no projection, no teacher
    tok, _ = load_media_tokenizer(str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"), expect_kind="audio")
    assert not any("semantic" in k for k in tok.state_dict())
    # the probe tool scores every level and all of them together
    from tools.audio_semantic_probe import probe_levels

    res = probe_levels(tok, train_clips=20, eval_clips=10, seconds=0.5)
    assert set(res["accuracy"]) == {f"level_{j + 1}" for j in range(res["levels"])} | {"all_levels"}
    assert all(0 <= v <= 1 for v in res["accuracy"].values()) and res["mel_l1_levels_1"] > 0
    assert set(res["frame_accuracy"]) == {f"level_{j + 1}" for j in range(res["levels"])}
    assert all(0 <= v <= 1 for v in res["frame_accuracy"].values())


def test_a_local_whisper_checkpoint_is_a_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     num_mel_bins=80, vocab_size=64, max_source_positions=1500,
                                     max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                     decoder_start_token_id=3)
    torch.manual_seed(0)
    transformers.WhisperModel(cfg).save_pretrained(tmp_path / "whisper")
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path / "whisper")
    t = load_teacher(tmp_path / "whisper", expect_rate=16000)
    feats = t.features(torch.randn(2, 8000) * 0.1)  # 0.5 s: Whisper's 50 frames / s
    assert feats.shape == (2, 25, 16) and t.dim == 16
    with pytest.raises(ValueError, match="must hold a Whisper checkpoint"):
        load_teacher(tmp_path)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="neither a Whisper directory nor an audio_teacher or visual_teacher checkpoint"):
        load_teacher(other)


def test_bad_semantic_config_names_the_key():
    with pytest.raises(ValueError, match="model.semantic.weight"):
        AudioTokenizerModule(net={"preset": "tiny"}, semantic={"weight": -1.0})
    with pytest.raises(ValueError, match="model.semantic.teacher=auto is filled by"):
        AudioTokenizerModule(net={"preset": "tiny"}, semantic={"teacher": "auto"})
    with pytest.raises(ValueError, match="model.net.layers"):
        FrameClassifierConfig(layers=0)
