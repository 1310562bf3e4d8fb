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
