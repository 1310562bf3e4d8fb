"""The refiner's LightningModule through train.py: metrics, checkpoints, exact resume, generation."""

from __future__ import annotations

import pytest
import torch

import train
from models.io import load_checkpoint
from models.refiner import load_refiner
from tests.conftest import compose_train_cfg
from tests.helpers import find_metrics, read_metric

QUIET = ["~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "extras.print_config=false", "logger=csv", "test=false"]


def refiner_cfg(tmp_path, *extra: str, subdir: str = "run"):
    return compose_train_cfg(
        ["experiment=ernie5_refiner", "model.net.preset=tiny", "data.image_size=32", "data.num_clips=8",
         "data.num_frames=2", "data.batch_size=4", "model.degrade.tokenizer=null", "model.sample.steps=3",
         "trainer.limit_val_batches=1", "model.optim.total_steps=6", *QUIET, *extra],
        tmp_path / subdir,
    )


def test_training_logs_refinement_metrics_and_the_checkpoint_loads(tmp_path, tiny_tokenizer):
    # through the frozen tiny tokenizer (16x16 frames): every input takes the round trip with bit flips
    cfg = refiner_cfg(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4",
                      f"model.degrade.tokenizer={tiny_tokenizer}", "model.degrade.tokenizer_prob=1.0")
    train.run(cfg)
    rows = find_metrics(tmp_path / "run")
    for key in ("val/loss", "val/psnr", "val/psnr_bicubic", "val/psnr_gain", "val/consistency_psnr",
                "val/chroma_ratio", "val/sharpness_ratio"):
        assert read_metric(rows, key), key
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["refiner"]["config"]["preset"] == "tiny"
    assert all(k.startswith("net.") for k in ckpt["state_dict"])  # no frozen tokenizer in it
    net = load_refiner(str(ckpt_path))
    out = net.sample(torch.zeros(1, 3, 16, 16), 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 32, 32)

    from tools import eval_refiner

    strip = tmp_path / "strip.png"
    res = eval_refiner.main([str(ckpt_path), "--num", "4", "--steps", "2", "--strip", str(strip), "--examples", "3",
                             "--out", str(tmp_path / "r.json"), "--device", "cpu"])
    assert res["size"] == 32 and set(res["held_out"]) == {"area", "tokenizer"}
    for m in res["held_out"].values():
        assert {"psnr", "psnr_bicubic", "psnr_gain", "consistency_psnr", "chroma_ratio"} <= set(m)
    # the area input's bicubic baseline is computed from the same frames the tool renders
    from tools.eval_refiner import held_out_frames
    from models.tokenizers.metrics import psnr

    target = held_out_frames(4, 32, 7)
    low = torch.nn.functional.interpolate(target, scale_factor=0.5, mode="area")
    assert res["held_out"]["area"]["psnr_bicubic"] == pytest.approx(psnr(net.upsample(low), target), abs=1e-3)
    from torchvision.io import decode_png, read_file

    png = decode_png(read_file(str(strip)))
    assert png.shape[-1] == 3 * 33 + 1 and png.shape[-2] == 7 * 33 + 1  # 3 columns, 4 + 3 rows of 32 px


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    common = ["trainer.val_check_interval=3", "callbacks.model_checkpoint.monitor=null",
              "callbacks.model_checkpoint.every_n_train_steps=1"]
    train.run(refiner_cfg(tmp_path, *common, "trainer.max_steps=6", subdir="full"))
    full = read_metric(find_metrics(tmp_path / "full"))
    train.run(refiner_cfg(tmp_path, *common, "trainer.max_steps=3", subdir="a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train.run(refiner_cfg(tmp_path, *common, "trainer.max_steps=6", f"ckpt_path={ckpt}", subdir="b"))
    resumed = {**read_metric(find_metrics(tmp_path / "a")), **read_metric(find_metrics(tmp_path / "b"))}
    assert sorted(full) == list(range(6)) and resumed == full


def test_tokenizer_auto_outside_train_py_is_a_clear_error():
    from lit_modules.refiner import RefinerModule

    with pytest.raises(ValueError, match="model.degrade.tokenizer=auto"):
        RefinerModule(net={"preset": "tiny"}, degrade={"tokenizer": "auto"})
