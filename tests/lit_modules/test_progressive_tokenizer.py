"""ERNIE 5.0's progressive tokenizer switching (papers.md 4.2): rows carry every stage tokenizer's
latents, a stage of fewer bits is exactly a smaller network on that tokenizer (the zero-padded slots
change nothing), the callback switches at its steps and a resumed run continues the same schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from datamodules.multimodal import MultimodalDataModule, collate_rows
from lit_modules.ernie5 import Ernie5Module
from models.ernie5 import Ernie5, Ernie5Config
from tests.conftest import _untrained_export, compose_train_cfg
from tests.helpers import find_metrics, read_metric

QUIET = ["~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "extras.print_config=false", "logger=csv"]
SMALL_DATA = dict(seq_len=192, batch_size=4, image_size=16, num_frames=5, clip_seconds=0.5, num_videos=8,
                  num_images=8, num_audio=8, val_videos=4, val_images=4, val_audio=4, num_people=40,
                  vocab_size=400, train_rows=16, val_rows=4, text_len=48)


def visual_export(tmp_path_factory, name: str, **kw) -> Path:
    from models.tokenizers.visual import TokenizerConfig, VisualTokenizer

    torch.manual_seed(1)
    cfg = TokenizerConfig(preset="tiny", **kw)
    return _untrained_export(tmp_path_factory, "visual", VisualTokenizer(cfg), cfg, name)


@pytest.fixture(scope="module")
def stage_tokenizer(tmp_path_factory) -> Path:
    """A tiny video tokenizer of 4 bits: the final tiny one has 8, with the same scales and grid."""
    return visual_export(tmp_path_factory, "tiny_video_tokenizer_4bit.pt", dim=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mm_cache_progressive")


def datamodule(vt, at, cache, stages=(), **kw) -> MultimodalDataModule:
    dm = MultimodalDataModule(str(vt), str(at), cache_dir=str(cache), visual_tokenizer_stages=[str(s) for s in stages],
                              **{**SMALL_DATA, **kw})
    dm.setup()
    return dm


def test_rows_carry_the_final_latents_then_each_stage_s(tiny_tokenizer, tiny_audio_tokenizer, stage_tokenizer, cache):
    from models.tokenizers.checkpoint import load_media_tokenizer

    plain = datamodule(tiny_tokenizer, tiny_audio_tokenizer, cache)
    staged = datamodule(tiny_tokenizer, tiny_audio_tokenizer, cache, [stage_tokenizer])
    assert staged.corpus.info["path"] != plain.corpus.info["path"]  # its own cache
    assert [s["bits"] for s in staged.corpus.info["visual_stages"]] == [4]
    stok, _ = load_media_tokenizer(str(stage_tokenizer), "visual")
    seen = 0
    for i in range(8):
        a, b = plain.datasets["train"][i], staged.datasets["train"][i]
        assert torch.equal(a["ids"], b["ids"])  # the same documents: only the latents grow
        for (kind, task, start, count, x), (_, _, _, _, y) in zip(a["spans"], b["spans"]):
            if kind not in ("vis_gen", "vis_und"):
                continue
            x = x[0] if isinstance(x, tuple) else x
            y, pixels = (y if isinstance(y, tuple) else (y, None))
            assert y.shape[1] == 8 + 4 and torch.equal(y[:, :8], x)
            if pixels is not None:  # the stage channels are the stage tokenizer's encoding of the same frames
                px = pixels.float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]
                px = px[:, :, 0] if px.shape[2] == 1 else px
                with torch.no_grad():
                    enc = stok.encode_features(px).transpose(1, 2)[0]
                assert torch.allclose(y[:, 8:], enc, atol=1e-5)
                seen += 1
    assert seen


@pytest.mark.parametrize("kw, match", [
    (dict(dim=16), "fewer to more bits"),
    (dict(dim=4, scales=[1, 2, 3, 4]), "scales"),
])
def test_a_stage_tokenizer_that_does_not_fit_is_named(kw, match, tmp_path_factory, tiny_tokenizer,
                                                      tiny_audio_tokenizer, cache):
    bad = visual_export(tmp_path_factory, "bad.pt", **kw)
    with pytest.raises(ValueError, match=match) as err:
        datamodule(tiny_tokenizer, tiny_audio_tokenizer, cache, [bad])
    assert "data.visual_tokenizer_stages.0" in str(err.value)


def narrowed(state: dict, D: int, d: int) -> dict:
    """The parameters of a network for d bits cut from one for D bits: the first d input columns and
    bit logits (every other tensor as is)."""
    out = dict(state)
    out["word_embed.weight"] = state["word_embed.weight"][:, :d]
    out["merger.proj.weight"] = state["merger.proj.weight"][:, :d]
    C = state["vis_head.weight"].shape[1]
    out["vis_head.weight"] = state["vis_head.weight"].view(D, 2, C)[:d].reshape(2 * d, C)
    out["vis_head.bias"] = state["vis_head.bias"].view(D, 2)[:d].reshape(-1)
    return out


def module(vt, at, vocab: int, stages=()) -> Ernie5Module:
    m = Ernie5Module(net=dict(preset="tiny", text_vocab=vocab), visual_tokenizer=str(vt), audio_tokenizer=str(at),
                     visual_tokenizer_stages=[str(s) for s in stages], cfec=dict(enabled=True))
    m.configure_model()
    return m


def test_a_stage_of_fewer_bits_equals_a_network_built_for_its_tokenizer(tiny_tokenizer, tiny_audio_tokenizer,
                                                                          stage_tokenizer, cache):
    """Reference: at stage 0 the 8-bit network (zero-padded inputs, first 4 bit logits) gives the losses
    of a 4-bit network on rows encoded by the 4-bit tokenizer alone, with the corresponding weights."""
    staged = datamodule(tiny_tokenizer, tiny_audio_tokenizer, cache, [stage_tokenizer])
    small = datamodule(stage_tokenizer, tiny_audio_tokenizer, cache)
    assert len(staged.vocab) == len(small.vocab)
    torch.manual_seed(0)
    big = module(tiny_tokenizer, tiny_audio_tokenizer, len(staged.vocab), [stage_tokenizer])
    ref = module(stage_tokenizer, tiny_audio_tokenizer, len(staged.vocab))
    assert big.net_cfg.bits == 8 and ref.net_cfg.bits == 4 and big.num_visual_stages == 2
    ref.net.load_state_dict(narrowed(big.net.state_dict(), 8, 4))
    big.visual_stage = 0
    assert big.visual_stage_slice() == (8, 4) and big.visual_tokenizer.cfg.dim == 4
    rows = list(range(12))
    b_big = collate_rows([staged.datasets["train"][i] for i in rows])
    b_ref = collate_rows([small.datasets["train"][i] for i in rows])
    assert b_big.vis_gen and b_big.vis_und
    big.eval(), ref.eval()
    with torch.no_grad():
        t_big, t_ref = big._losses(b_big, corrupt=False)["terms"], ref._losses(b_ref, corrupt=False)["terms"]
    assert set(t_big) == set(t_ref) >= {"text", "image", "video", "audio"}
    for k in t_ref:
        assert float(t_big[k]) == pytest.approx(float(t_ref[k]), abs=1e-5), k
    # the final stage reads the first 8 channels: the same as a plain 8-bit run on the plain rows
    big.visual_stage = 1
    plain = datamodule(tiny_tokenizer, tiny_audio_tokenizer, cache)
    with torch.no_grad():
        a = big._losses(b_big, corrupt=False)["terms"]
        b = big._losses(collate_rows([plain.datasets["train"][i] for i in rows]), corrupt=False)["terms"]
    for k in a:
        assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-6), k
    # a stage the data was not encoded for is named
    big.visual_stage = 0
    with pytest.raises(ValueError, match="visual_tokenizer_stages"):
        big._losses(collate_rows([plain.datasets["train"][i] for i in rows]), corrupt=False)
    with pytest.raises(ValueError, match="visual_stage must be in"):
        big.visual_stage = 2


def test_generation_with_a_stage_quantizer_equals_the_narrow_network():
    from models.tokenizers.visual import TokenizerConfig, VisualTokenizer

    torch.manual_seed(0)
    base = dict(text_vocab=100, scales=[[1, 1], [2, 2], [4, 4]], audio_levels=2, audio_codebook=16, n_layers=3)
    wide = Ernie5(Ernie5Config(bits=8, **base)).eval()
    narrow = Ernie5(Ernie5Config(bits=4, **base)).eval()
    narrow.load_state_dict(narrowed(wide.state_dict(), 8, 4))
    q = VisualTokenizer(TokenizerConfig(preset="tiny", dim=4)).quantizer
    kw = dict(guidance=2.0, uncond_prompt=[("text", [5])], temperature=1.0)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = wide.generate_visual(q, [("text", [4, 5])], 2, generator=g(), **kw)
    b = narrow.generate_visual(q, [("text", [4, 5])], 2, generator=g(), **kw)
    c = wide.generate_visual(q, [("text", [4, 5])], 2, generator=g(), use_cache=False, **kw)
    assert all(x.shape[-1] == 4 for x in a)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


def test_callback_switch_points_and_errors():
    from callbacks.progressive_tokenizer import ProgressiveTokenizer

    cb = ProgressiveTokenizer([0.25, 60])
    assert [cb.stage(s, 100) for s in (0, 24, 25, 59, 60, 99)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="must ascend"):
        ProgressiveTokenizer([0.5, 20]).steps(100)
    assert ProgressiveTokenizer([0.25, 0.5]).stage(0, 1) == 2  # a 1-step run: both points round to 0
    for bad in ([0], [1.5], ["x"], [True]):
        with pytest.raises(ValueError, match=r"switch_at\.0"):
            ProgressiveTokenizer(bad)


def cfg_for(tmp_path, vt, at, stage, cache, *extra, subdir="run"):
    data = [f"data.{k}={v}" for k, v in SMALL_DATA.items()]
    return compose_train_cfg(["experiment=ernie5_tiny", f"data.visual_tokenizer={vt}", f"data.audio_tokenizer={at}",
                              f"data.visual_tokenizer_stages=[{stage}]", f"data.cache_dir={cache}", *data,
                              "model.sample.num=1", "+callbacks/progressive_tokenizer=default",
                              "callbacks.progressive_tokenizer.switch_at=[2]", *QUIET, *extra], tmp_path / subdir)


def test_training_switches_at_the_step_and_resumes_the_same_schedule(tmp_path, tiny_tokenizer, tiny_audio_tokenizer,
                                                                      stage_tokenizer, cache):
    extra = ["trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false",
             "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.save_top_k=-1",
             "model.optim.total_steps=4"]
    full = cfg_for(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, stage_tokenizer, cache, *extra, "trainer.max_steps=4",
                   subdir="full")
    _, objs = train.run(full)
    m = find_metrics(Path(full.paths.output_dir))
    assert read_metric(m, "train/visual_bits") == {0: 4.0, 1: 4.0, 2: 8.0, 3: 8.0}
    assert objs["model"].visual_stage == 1
    loss_full = read_metric(m, "train/loss")
    part = cfg_for(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, stage_tokenizer, cache, *extra, "trainer.max_steps=2",
                   subdir="part")
    train.run(part)
    ckpt = Path(part.paths.output_dir) / "checkpoints" / "step000002.ckpt"
    assert torch.load(ckpt, weights_only=True)["knobs"]["visual_stage"] == 0
    resumed = cfg_for(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, stage_tokenizer, cache, *extra,
                      "trainer.max_steps=4", f"ckpt_path={ckpt}", subdir="resumed")
    train.run(resumed)
    loss_res = read_metric(find_metrics(Path(resumed.paths.output_dir)), "train/loss")
    assert set(loss_res) == {2, 3}
    for step, value in loss_res.items():
        assert value == pytest.approx(loss_full[step], abs=1e-6)
    # a checkpoint rebuilds every tokenizer; it generates with the stage it was saved at
    early = Ernie5Module.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    assert early.num_visual_stages == 2 and early.visual_stage == 0
    tokens, image = early.render("a red circle", "image", 1, torch.Generator().manual_seed(0))
    assert tokens[0].shape[-1] == 4 and image.shape == (1, 3, 1, 16, 16)
    last = Ernie5Module.load_from_checkpoint(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt",
                                             map_location="cpu", weights_only=True)
    assert last.visual_stage == 1 and last.render("a red circle", "image", 1)[0][0].shape[-1] == 8
    # the tools that run the network over DataModule rows read the checkpoint's stage of them
    from tools.eval_ernie5 import text_loss
    from tools.routing_report import collect

    dm = objs["datamodule"]
    for m in (early, last):
        assert set(collect(m, dm, "val", 4, batch_size=2)) and torch.isfinite(torch.tensor(text_loss(m, dm, 4, "image_und")))


def test_switch_points_must_match_the_stage_tokenizers(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, stage_tokenizer,
                                                      cache):
    cfg = cfg_for(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, stage_tokenizer, cache, "trainer.max_steps=1",
                  "callbacks.progressive_tokenizer.switch_at=[1,2]")
    with pytest.raises(ValueError, match="callbacks.progressive_tokenizer.switch_at has 2 switch points"):
        train.run(cfg)
