"""VideoAR LightningModule: knobs set by hand change the batch/loss as documented, callbacks and
their resume, staged pre-training chaining, FSDP2 on 2 CPU processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from callbacks.videoar import CrossFrameErrorCorrection, RandomFrameMask, ramp_factor
from models.videoar import CFECConfig
from tests.conftest import compose_train_cfg
from tests.helpers import find_metrics, read_metric, run_train_cli

QUIET = ["~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "extras.print_config=false", "logger=csv"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def cfg_for(tmp_path: Path, tokenizer: Path, *extra: str, experiment: str = "videoar", subdir: str = "run"):
    return compose_train_cfg([f"experiment={experiment}", f"model.tokenizer_ckpt={tokenizer}", "model.net.preset=tiny",
                              "data.image_size=16", "data.num_frames=5", "data.num_clips=8", "data.batch_size=4",
                              "model.sample.num_clips=0", *QUIET, *extra], tmp_path / subdir)


def _module_and_batch(tmp_path, tokenizer):
    import hydra

    cfg = cfg_for(tmp_path, tokenizer, "model.net.num_classes=12")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    module.configure_model()
    batch = next(iter(dm.train_dataloader()))
    return module, batch


class _FakeLoop:
    total_batch_idx = 0


class _FakeTrainer:
    fit_loop = _FakeLoop()
    datamodule = None
    global_rank = 0


def _loss_with_knobs(module, batch, **knobs):
    for k, v in knobs.items():
        setattr(module, k, v)
    module._trainer = _FakeTrainer()
    torch.manual_seed(0)
    out = module._step(batch, "train", corrupt=True)
    module._trainer = None
    return out


def test_knobs_set_by_hand_change_the_batch_as_documented(tmp_path, tokenizer):
    module, batch = _module_and_batch(tmp_path, tokenizer)
    module.net_cfg.cond_dropout = 0.0
    plain = _loss_with_knobs(module, batch, cfec=CFECConfig(enabled=False), frame_mask_prob=0.0)
    clean = module._step(batch, "val", corrupt=False)
    assert torch.allclose(plain["loss"], clean["loss"]) and plain["flip_p"].abs().sum() == 0
    flipped = _loss_with_knobs(module, batch, cfec=CFECConfig(enabled=True, p_min=0.2, p_max=0.2, delta=0.0))
    assert torch.allclose(flipped["flip_p"], torch.full_like(flipped["flip_p"], 0.2))
    assert not torch.equal(flipped["labels"], plain["labels"])  # re-quantized targets
    masked = _loss_with_knobs(module, batch, cfec=CFECConfig(enabled=False), frame_mask_prob=0.5)
    assert masked["keep"] is not None and not bool(masked["keep"].all())
    assert not torch.allclose(masked["loss"], plain["loss"])


def test_schedules_at_chosen_steps():
    assert ramp_factor(5, "constant", start_step=10) == 0.0 and ramp_factor(10, "constant", start_step=10) == 1.0
    assert ramp_factor(60, "linear", 10, 100) == pytest.approx(0.5)
    assert ramp_factor(60, "cosine", 10, 100) == pytest.approx(0.5)
    assert ramp_factor(35, "cosine", 10, 100) == pytest.approx(0.5 * (1 - 0.7071067811865476))
    assert ramp_factor(500, "linear", 10, 100) == 1.0
    ms = [[0, 0.0], [100, 0.5], [200, 1.0]]
    assert [ramp_factor(s, "step", milestones=ms) for s in (0, 99, 100, 250)] == [0.0, 0.0, 0.5, 1.0]
    cb = CrossFrameErrorCorrection(p_max=0.2, delta=0.02, schedule="linear", ramp_steps=100)
    assert not cb.config_at(0).enabled
    c = cb.config_at(50)
    assert c.enabled and c.p_max == pytest.approx(0.1) and c.delta == pytest.approx(0.01)
    fm = RandomFrameMask(p_mask=0.2, window=2, schedule="step", milestones=[[10, 1.0]])

    class M:
        frame_mask_prob, frame_mask_window = 0.0, None

    m = M()
    fm._apply(5, m)
    assert m.frame_mask_prob == 0.0
    fm._apply(10, m)
    assert m.frame_mask_prob == pytest.approx(0.2) and m.frame_mask_window == 2
    with pytest.raises(ValueError, match="schedule"):
        RandomFrameMask(schedule="exp")


def test_callbacks_set_knobs_log_and_resume(tmp_path, tokenizer):
    extra = ["+callbacks/cfec=default", "callbacks.cfec.schedule=linear", "callbacks.cfec.ramp_steps=4",
             "+callbacks/frame_mask=default", "callbacks.frame_mask.p_mask=0.3", "trainer.val_check_interval=2",
             "trainer.limit_val_batches=1", "test=false", "callbacks.model_checkpoint.every_n_train_steps=2",
             "callbacks.model_checkpoint.save_top_k=-1"]
    full = cfg_for(tmp_path, tokenizer, *extra, "trainer.max_steps=4", subdir="full")
    _, objs = train.run(full)
    assert isinstance(objs["model"].cfec, CFECConfig) and objs["model"].cfec.enabled
    metrics = find_metrics(Path(full.paths.output_dir))
    p_max = read_metric(metrics, "cfec/p_max")
    assert p_max[0] == 0.0 and p_max[2] == pytest.approx(0.125) and p_max[3] == pytest.approx(0.1875)
    assert all(v == pytest.approx(0.3) for v in read_metric(metrics, "frame_mask/p_mask").values())
    loss_full = read_metric(metrics, "train/loss")
    # stop after 2 steps, resume to 4: same schedule values and the same losses
    part = cfg_for(tmp_path, tokenizer, *extra, "trainer.max_steps=2", subdir="part")
    train.run(part)
    ckpt = sorted((Path(part.paths.output_dir) / "checkpoints").glob("step*.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert any("CrossFrameErrorCorrection" in k for k in state["callbacks"])
    resumed = cfg_for(tmp_path, tokenizer, *extra, "trainer.max_steps=4", f"ckpt_path={ckpt}", subdir="resumed")
    train.run(resumed)
    m2 = find_metrics(Path(resumed.paths.output_dir))
    assert read_metric(m2, "cfec/p_max") == {k: v for k, v in p_max.items() if k >= 2}
    for step, value in read_metric(m2, "train/loss").items():
        assert value == pytest.approx(loss_full[step], abs=1e-6)


def test_staged_pretraining_configs_chain(tmp_path, tokenizer):
    common = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "test=false", "model.net.preset=tiny",
              "data.num_clips=6", "data.batch_size=2"]
    s1 = cfg_for(tmp_path, tokenizer, *common, "data.image_size=8", "data.num_frames=3", "model.tokenizer_scales=[1,2]",
                 experiment="videoar_stage1", subdir="s1")
    assert s1.model.image_prob > 0
    train.run(s1)
    c1 = Path(s1.paths.output_dir) / "checkpoints" / "last.ckpt"
    s2 = cfg_for(tmp_path, tokenizer, *common, f"model.init_ckpt={c1}", experiment="videoar_stage2", subdir="s2")
    _, objs = train.run(s2)
    assert objs["model"].init_report["resized"] == ["scale_emb.weight"]  # 2 -> 3 scales
    first = torch.load(c1, map_location="cpu", weights_only=False)["state_dict"]
    # the trunk starts from stage I (checked on a weight the 1 step of stage II barely moves)
    assert first["net.scale_emb.weight"].shape[0] == 2
    c2 = Path(s2.paths.output_dir) / "checkpoints" / "last.ckpt"
    s3 = cfg_for(tmp_path, tokenizer, *common, f"model.init_ckpt={c2}", "data.num_frames=7", experiment="videoar_stage3",
                 subdir="s3")
    _, objs = train.run(s3)
    assert objs["model"].init_report["resized"] == []


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes(tmp_path, tokenizer):
    out = tmp_path / "fsdp"
    run_train_cli(["experiment=videoar", f"model.tokenizer_ckpt={tokenizer}", "model.net.preset=tiny", "data.image_size=16",
                   "data.num_frames=5", "data.num_clips=8", "data.batch_size=4", "model.sample.num_clips=0",
                   "trainer=fsdp", "trainer.devices=2", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                   "trainer.val_check_interval=2", "test=false", *QUIET, f"hydra.run.dir={out}"])
    loss = read_metric(find_metrics(out), "train/loss")
    assert len(loss) == 2 and all(torch.isfinite(torch.tensor(v)) for v in loss.values())


def test_generate_cli_class_to_video_and_continuation_past_trained_length(tmp_path, tokenizer):
    import generate
    from datamodules.media_io import read_video, write_video

    cfg = cfg_for(tmp_path, tokenizer, "trainer.max_steps=1", "trainer.limit_val_batches=0", "test=false",
                  "model.net.max_frames=3")
    train.run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    paths = generate.main([str(ckpt), "--classes", "0", "3", "--frames", "3", "--out", str(tmp_path / "s"),
                           "--device", "cpu"])
    frames, _ = read_video(paths[1])
    assert len(paths) == 2 and frames.shape == (5, 16, 16, 3)  # 3 latent frames = 1 + 2 * 2 pixel frames
    # continue a 3-frame clip (2 latent frames) to 6 latent frames = 11 pixel frames, past max_frames=3:
    # windows of 3 latent frames, the last frame of each window re-encoded as the next one's context
    clip = (torch.rand(3, 16, 16, 3) * 255).byte()
    write_video(tmp_path / "c.mp4", clip, fps=4)
    paths = generate.main([str(ckpt), "--classes", "1", "--frames", "6", "--continue-from", str(tmp_path / "c.mp4"),
                           "--window", "3", "--overlap", "1", "--out", str(tmp_path / "c"), "--format", "mp4",
                           "--device", "cpu"])
    frames, _ = read_video(paths[0])
    assert frames.shape[0] == 1 + 2 * 5


def test_frechet_distance_reference_values():
    from tools.eval_videoar import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(4000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    # N(0, I) vs N((1,0,0), 4I): |mu|^2 + 3 * (1 + 4 - 2 * 2) = 1 + 3 = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)


def test_eval_tool_reports_every_metric(tmp_path, tokenizer):
    from tools.eval_videoar import evaluate

    cfg = cfg_for(tmp_path, tokenizer, "trainer.max_steps=1", "trainer.limit_val_batches=0", "test=false")
    train.run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    res = evaluate(str(ckpt), ["experiment=videoar", f"model.tokenizer_ckpt={tokenizer}", "data.image_size=16",
                               "data.num_frames=5", "data.num_clips=16", "data.val_fraction=0.5"], num_clips=8, batch=4)
    assert res["clips"] == 8 and res["latent_frames"] == 3
    assert res["fd_tokenizer"] >= 0 and set(res["future_psnr"]) == {1, 2} and len(res["bit_acc_per_frame"]) == 3
    colour = res["tokenizer_colour"]
    assert {"chroma_ratio", "chroma_error", "psnr_r", "psnr_g", "psnr_b", "psnr_y", "psnr_cbcr"} <= set(colour)
    assert colour["chroma_real"] > 0 and res["generated_chroma_ratio"] >= 0
    ci = res["ci95"]  # bootstrap intervals over the 8 clips
    assert ci["resamples"] == 200 and ci["fd_tokenizer"][0] <= ci["fd_tokenizer"][1]
    assert set(ci["future_psnr"]) == {1, 2} and len(ci["bit_acc_per_frame"]) == 3
    for h, (lo, hi) in ci["future_psnr"].items():
        assert lo <= res["future_psnr"][h] <= hi
    assert all(0 <= lo <= hi <= 1 for lo, hi in ci["bit_acc_per_frame"])


def test_sparse_videoar_trains_with_balance_loss_routing_monitor_and_bias_updates(tmp_path, tokenizer):
    """videoar_moe on the trunk: balance loss in the objective, per-layer routing statistics from the
    shared monitor, aux-loss-free bias updates, and a checkpoint that loads back the same model."""
    cfg = cfg_for(tmp_path, tokenizer, "trainer.max_steps=3", "trainer.val_check_interval=3",
                  "trainer.limit_val_batches=1", "callbacks.moe_monitor.every_n_steps=1",
                  "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.moe.bias_balancing=true",
                  "model.net.moe.bias_update_rate=0.1", "test=false", experiment="videoar_moe")
    metrics, objects = train.run(cfg)
    logged = read_metric(find_metrics(tmp_path / "run"), "train/balance_loss")
    assert sorted(logged) == [0, 1, 2] and all(v > 0 for v in logged.values())
    assert sorted(read_metric(find_metrics(tmp_path / "run"), "moe/max_violation/layer_1")) == [0, 1, 2]
    module = objects["model"]
    bias = module.net.trunk.layers[0].ffn.router.expert_bias
    assert bias.abs().sum() > 0  # three bias steps of +-0.1 per expert
    from generate import load_videoar

    again = load_videoar(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(again.net.trunk.layers[0].ffn.router.expert_bias, bias)
