"""The caption verifier: per-field hits and the reward of hand-written captions against a true one."""

import pytest

from datamodules.captions import caption_hits, caption_reward


def test_visual_caption_reward_counts_the_fields_the_caption_gets_right():
    truth = "a large red circle moves from left to right over a striped background"
    assert caption_reward("video", truth, truth) == 1.0
    hits = caption_hits("video", "a large blue circle moves from left to right over a striped background", truth)
    assert hits == {"colour": False, "shape": True, "background": True, "direction": True}
    assert caption_reward("video", "a large blue circle moves from left to right over a striped background",
                          truth) == pytest.approx(0.75)
    assert caption_reward("video", "nothing to see", truth) == 0.0
    image = "a large green square over a plain background"
    assert set(caption_hits("image", image, image)) <= {"colour", "shape", "background"}


def test_audio_caption_reward_scores_the_kind_and_the_duration():
    truth = "a steady tone at 440 hertz lasting 0.5 seconds"
    assert caption_reward("audio", truth, truth) == 1.0
    assert caption_hits("audio", "a steady tone at 300 hertz lasting 0.9 seconds", truth) == {"kind": True, "duration": False}
    assert caption_reward("audio", "", truth) == 0.0
    with pytest.raises(ValueError, match="medium must be"):
        caption_reward("smell", truth, truth)


def test_caption_prompts_take_turns_over_media_whatever_their_counts():
    from types import SimpleNamespace

    import torch

    from datamodules.multimodal import CaptionPrompts

    split = {"image": torch.zeros(2, 1), "video": torch.zeros(3, 1), "audio": torch.zeros(8, 1)}
    corpus = SimpleNamespace(splits={"train": split, "val": split})
    ds = CaptionPrompts(corpus, "train", ["image", "video", "audio"], balanced=True)
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 3 * 8
    for m, n in (("image", 2), ("video", 3), ("audio", 8)):
        idx = [x["index"] for x in items if x["medium"] == m]
        assert len(idx) == 8 and set(idx) == set(range(n))  # equally often, every item used
    val = CaptionPrompts(corpus, "val", ["image", "audio"], per_medium=4)
    assert [val[i] for i in range(len(val))] == [{"medium": "image", "index": 0}, {"medium": "image", "index": 1}] + \
        [{"medium": "audio", "index": j} for j in range(4)]
    with pytest.raises(ValueError, match="no items of data.caption_media"):
        CaptionPrompts(SimpleNamespace(splits={"train": {"image": torch.zeros(0, 1)}}), "train", ["image"])
