"""The visual tokenizer's semantic branch (papers.md 4.2): attribute labels of the embedded frames, the
image attribute classifier that stands in for a vision foundation model, and the distillation term
(pooled over the latent grid and each latent frame's frames, straight-through to the encoder, the
projection outside the export, the teacher built on demand by `requires`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from datamodules.captions import (ATTRIBUTES, COLOUR_NAMES, attribute_label, attribute_names, image_fields,
                                  split_attribute_label)
from datamodules.media import ImageDataModule
from datamodules.synthetic_shapes import clip_params
from lit_modules.visual_tokenizer import VisualTokenizerModule, load_visual_tokenizer
from models.tokenizers.semantic import AttributeClassifierConfig, ImageAttributeClassifier, load_teacher
from tests.conftest import compose_train_cfg
from tests.lit_modules.test_visual_tokenizer_module import QUIET, video_cfg

TEACHER = ["data.image_size=16", "data.num_clips=24", "data.num_frames=2", "data.batch_size=8", "model.net.channels=8",
           "model.net.dim=8", "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
           "test=false"]


def test_attribute_labels_name_the_main_object_and_the_background():
    names = attribute_names()
    assert len(names) == 12 * 3 * 5 and names[0] == "red circle plain" and names[-1] == "brown triangle checker"
    for p in clip_params(40, 1, 32, seed=3):
        label = attribute_label(p)
        colour, shape, background = split_attribute_label(label, [len(v) for v in ATTRIBUTES.values()])
        assert names[label] == f"{COLOUR_NAMES[colour]} {ATTRIBUTES['shape'][shape]} {p['background']}"
        assert shape == int(p["shape"][0]) and ATTRIBUTES["background"][background] == p["background"]
        main = image_fields(p)["objects"][0]  # the main object is drawn large and never hidden at frame 0 here
        assert COLOUR_NAMES[colour] == main["colour"] and main["size"] == "large"
    # tensors split element-wise
    assert [t.tolist() for t in split_attribute_label(torch.tensor([0, 179]), (12, 3, 5))] == [[0, 11], [0, 2], [0, 4]]


def test_image_data_with_attribute_labels(tmp_path):
    dm = ImageDataModule(image_size=16, num_clips=6, num_frames=2, labels="attributes")
    dm.setup()
    params = clip_params(6, 2, 16, seed=0)
    assert dm.class_names == attribute_names()
    groups, labels, _ = dm._synthetic_groups()
    assert labels == [attribute_label(p) for p in params]
    assert torch.equal(torch.cat(groups), torch.cat(ImageDataModule(image_size=16, num_clips=6, num_frames=2)
                                                    ._synthetic_groups()[0]))  # the same pixels
    with pytest.raises(ValueError, match="data.labels must be 'class' or 'attributes'"):
        ImageDataModule(labels="colour")
    with pytest.raises(ValueError, match="data.labels=attributes .* data.source=synthetic"):
        ImageDataModule(source=str(tmp_path), labels="attributes")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("visual_teacher")
    metrics, _ = train.run(compose_train_cfg(["experiment=visual_teacher", *TEACHER, *QUIET], out))
    assert {"val/acc_colour", "val/acc_shape", "val/acc_background"} <= set(metrics)
    return out / "checkpoints" / "last.ckpt"


def test_teacher_loads_frozen_and_maps_frames_to_the_latent_grid(teacher_ckpt, tmp_path):
    t = load_teacher(teacher_ckpt)
    assert isinstance(t, ImageAttributeClassifier) and not t.training and not any(p.requires_grad for p in t.parameters())
    assert t.feature_map(torch.zeros(2, 3, 16, 16)).shape == (2, 8, 4, 4) and t.dim == 8
    assert [lg.shape[-1] for lg in t(torch.zeros(2, 3, 16, 16))] == [12, 3, 5]
    with pytest.raises(ValueError, match="is a visual teacher; the audio tokenizer needs an audio one"):
        load_teacher(teacher_ckpt, expect_rate=16000)
    # a bare export (the classifier's own state dict) loads too
    bare = tmp_path / "bare.ckpt"
    torch.save({"teacher": {"kind": "attribute_classifier", "config": t.cfg.to_dict()}, "state_dict": t.state_dict()},
               bare)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(load_teacher(bare).feature_map(x), t.feature_map(x))
    with pytest.raises(ValueError, match="model.net.heads"):
        AttributeClassifierConfig(heads=(12, 1), head_names=("colour", "shape"))
    with pytest.raises(ValueError, match="model.net.downsample"):
        AttributeClassifierConfig(layers=2, downsample=3)


def test_semantic_branch_trains_the_latent_towards_the_teacher(teacher_ckpt, tmp_path):
    cfg = video_cfg(tmp_path, f"model.semantic.teacher={teacher_ckpt}", "trainer.max_steps=3",
                    "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "test=false")
    metrics, objs = train.run(cfg)
    module: VisualTokenizerModule = objs["model"]
    assert -1.0 <= metrics["val/semantic_cos"] <= 1.0
    x = next(iter(objs["datamodule"].train_dataloader())).pixels  # [B, 3, 5, 16, 16]: 3 latent frames (tau 2)
    assert x.shape[2] == 5 and module.net_cfg.time_stride == 2
    # the target by hand: latent frame 0 <- frame 0, 1 <- the mean of frames 1-2, 2 <- of frames 3-4, pooled to 4x4
    with torch.no_grad():
        maps = [F.adaptive_avg_pool2d(module.teacher.feature_map(x[:, :, t]), (4, 4)) for t in range(5)]
        want = torch.stack([maps[0], (maps[1] + maps[2]) / 2, (maps[3] + maps[4]) / 2], 1).flatten(0, 1)
        torch.testing.assert_close(module.semantic_target(x, (4, 4)), want, rtol=1e-5, atol=1e-5)
        out = module.net(x)
        cos = F.cosine_similarity(module.semantic_proj(out["f_hat"]), want, dim=1).mean()
        assert float(module.semantic_cosine(x, out)) == pytest.approx(float(cos), abs=1e-5)
        # images: one latent frame per image
        img = x[:, :, 0]
        torch.testing.assert_close(module.semantic_target(img, (4, 4)), maps[0], rtol=1e-5, atol=1e-5)
    # the gradient reaches the encoder (straight-through) and the projection, never the decoder or the teacher
    module.zero_grad(set_to_none=True)
    out = module.net(x)
    (1 - module.semantic_cosine(x, out)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.encoder.parameters())
    assert module.semantic_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.net.decoder.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    # the projection trains with the tokenizer (it is in the optimiser), and the export is an ordinary tokenizer
    opt = module.optimizers().optimizer if hasattr(module.optimizers(), "optimizer") else module.optimizers()[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(module.semantic_proj.weight) in in_opt
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    tok = load_visual_tokenizer(str(ckpt))
    assert not any("semantic" in k for k in tok.state_dict())
    # the probe tool: linear probes of the attributes from the latent, against the majority answer
    from tools.visual_semantic_probe import clip_labels, main as probe_main

    res = probe_main([str(ckpt), "--train-clips", "16", "--eval-clips", "8", "--frames", "5", "--size", "16",
                      "--out", str(tmp_path / "probe.json")])
    assert set(res["latent"]) == set(res["pooled"]) == set(res["chance"]) == {"colour", "shape", "background"}
    assert all(0.0 <= v <= 1.0 for k in ("latent", "pooled", "chance") for v in res[k].values())
    assert (tmp_path / "probe.json").is_file()
    labels = clip_labels(8, 5, 16, 2000)
    assert res["chance"]["shape"] == pytest.approx(
        sum(y["shape"] == max(set(t["shape"] for t in clip_labels(16, 5, 16, 1000)),
                              key=[t["shape"] for t in clip_labels(16, 5, 16, 1000)].count) for y in labels) / 8)
    # the checkpoint resumes into a module with the branch (the projection is in its state dict)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert {"semantic_proj.weight", "semantic_proj.bias"} <= set(state)


def test_an_audio_teacher_or_a_bad_weight_is_an_error(tmp_path):
    from models.tokenizers.semantic import AudioFrameClassifier, FrameClassifierConfig

    a = AudioFrameClassifier(FrameClassifierConfig(channels=4, dim=4))
    path = tmp_path / "audio_teacher.ckpt"
    torch.save({"teacher": {"kind": "frame_classifier", "config": a.cfg.to_dict()}, "state_dict": a.state_dict()}, path)
    m = VisualTokenizerModule(net={"preset": "tiny", "video": False}, semantic={"teacher": str(path)})
    with pytest.raises(ValueError, match="is an audio teacher; the visual tokenizer needs a visual one"):
        m.configure_model()
    with pytest.raises(ValueError, match="model.semantic.weight"):
        VisualTokenizerModule(net={"preset": "tiny"}, semantic={"weight": -1.0})
    with pytest.raises(ValueError, match="model.semantic.teacher=auto is filled by"):
        VisualTokenizerModule(net={"preset": "tiny"}, semantic={"teacher": "auto"})


def test_requires_builds_the_teacher_only_when_asked(monkeypatch, tmp_path):
    from omegaconf import OmegaConf, open_dict

    import tools.artifacts as artifacts

    built = []
    monkeypatch.setattr(artifacts, "_build_once", lambda target, build, what, fp: built.append((what, fp)) or target)
    fps = {}
    for exp in ("image_tokenizer", "video_tokenizer"):
        for teacher in ("null", "auto"):
            cfg = artifacts.compose([f"experiment={exp}", f"model.semantic.teacher={teacher}",
                                     f"paths.artifacts_dir={tmp_path}"])
            with open_dict(cfg):
                cfg.hydra = OmegaConf.create({"runtime": {"choices": {}}})
            before = len(built)
            artifacts.ensure_requirements(cfg)
            fps[exp, teacher] = built[before:]
            assert (cfg.model.semantic.teacher is not None) == (teacher == "auto")
    assert [w for w, _ in fps["image_tokenizer", "null"]] == []
    assert [w for w, _ in fps["image_tokenizer", "auto"]] == ["experiment=visual_teacher"]
    # the video tokenizer builds the teacher, then the plain image tokenizer it inflates (the same one as without)
    assert [w for w, _ in fps["video_tokenizer", "auto"]] == ["experiment=visual_teacher", "experiment=image_tokenizer"]
    assert fps["video_tokenizer", "auto"][1] == fps["video_tokenizer", "null"][0]


@pytest.mark.parametrize("kind", ["vit", "dinov2", "clip_vision_model", "siglip_vision_model"])
def test_a_local_vision_foundation_model_is_a_teacher(kind, tmp_path):
    """A Hugging Face vision encoder directory (tiny and random here, saved locally) is the visual tokenizer's
    teacher: frames in [-1, 1] resized and normalised as its processor says, the feature map its patch tokens
    on the patch grid (after the CLS / register tokens), and the tokenizer trains with it."""
    transformers = pytest.importorskip("transformers")
    common = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**common))
    elif kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    elif kind == "clip_vision_model":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    torch.manual_seed(0)
    model.eval().save_pretrained(tmp_path / kind)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / kind / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    t = load_teacher(tmp_path / kind)
    assert not t.training and not any(p.requires_grad for p in t.parameters()) and t.dim == 16
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    fm = t.feature_map(x)
    assert fm.shape == (2, 16, 4, 4)
    # by hand: resize to 32 px, [-1, 1] -> [0, 1], normalise, the last 16 tokens row-major on the 4x4 grid
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    pix = ((up + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=pix).last_hidden_state
    cls = 0 if kind.startswith("siglip") else 1  # one CLS token before the patches (SigLIP has none)
    assert hidden.shape[1] == 16 + cls
    torch.testing.assert_close(fm[:, :, 1, 2], hidden[:, cls + 1 * 4 + 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fm.flatten(2).transpose(1, 2), hidden[:, cls:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is a vision encoder .* the audio tokenizer needs an audio one"):
        load_teacher(tmp_path / kind, expect_rate=16000)
    if kind != "vit":
        return
    # the video tokenizer distils from it (the branch's own test checks the target and the gradients)
    cfg = video_cfg(tmp_path / "run", f"model.semantic.teacher={tmp_path / kind}", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false")
    metrics, objs = train.run(cfg)
    assert -1.0 <= metrics["val/semantic_cos"] <= 1.0
    assert objs["model"].semantic_proj.out_channels == 16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_teacher(tmp_path / "other")
