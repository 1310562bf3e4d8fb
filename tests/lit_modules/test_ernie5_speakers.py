"""ERNIE 5.0's TTS speaker token (papers.md 4.3) end to end: synthetic voices, the reference each audio
generation document draws, the network it switches on, training, `generate.py --reference` and the
voice probe of `tools/eval_ernie5.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train
from datamodules.multimodal import MultimodalDataModule, RowDataset, collate_rows
from datamodules.synthetic_audio import apply_voice, audio_params, render_synthetic_audio, voice_params
from models.ernie5 import KINDS, TASKS
from tests.conftest import compose_train_cfg
from tests.lit_modules.test_ernie5_module import QUIET, SMALL_DATA, cfg_for

VOICES = 3


def test_code_information_by_hand():
    from tools.eval_ernie5 import code_information

    # level 0 names the label exactly (I = H(label) = log 2); level 1 is the same code everywhere (I = 0)
    codes = torch.tensor([[[0, 3], [0, 3]], [[1, 3], [1, 3]], [[0, 3], [0, 3]], [[1, 3], [1, 3]]])
    info = code_information(codes, torch.tensor([0, 1, 0, 1]), 4)
    assert info["mi"] == pytest.approx([np.log(2), 0.0]) and info["code_entropy"] == pytest.approx([np.log(2), 0.0])
    # independent: every (code, label) pair equally often
    codes = torch.tensor([[[0], [1]], [[0], [1]]])
    assert code_information(codes, torch.tensor([0, 1]), 2)["mi"] == pytest.approx([0.0])


def test_voices_keep_the_content_draws_and_colour_the_spectrum():
    plain, labels, _, p0 = render_synthetic_audio(12, 0.5, seed=3, return_params=True)
    voiced, labels_v, _, pv = render_synthetic_audio(12, 0.5, seed=3, return_params=True, voices=VOICES)
    again = render_synthetic_audio(12, 0.5, seed=3, voices=VOICES)[0]
    assert torch.equal(labels, labels_v) and torch.equal(voiced, again) and "voice" not in p0[0]
    assert {p["voice"] for p in pv} <= set(range(VOICES)) and len({p["voice"] for p in pv}) > 1
    for a, b in zip(p0, pv):  # the content is drawn as without voices
        assert {k: v for k, v in b.items() if k not in ("voice", "peak")} == {k: v for k, v in a.items() if k != "peak"}
    # a voice's gain, by hand: tilt (dB per octave from 1 kHz) plus a +12 dB Gaussian formant; odd voices add tremolo
    sr, n = 16000, 16000
    x = np.random.default_rng(0).standard_normal(n)
    f = np.fft.rfftfreq(n, 1 / sr)
    for v in range(VOICES):
        vp = voice_params(v, VOICES)
        y = apply_voice(x, sr, vp)
        if not vp["tremolo_hz"]:
            for hz in (250, vp["formant"], 3000):
                i = int(round(hz))
                db = vp["tilt_db_per_octave"] * np.log2(f[i] / 1000) + 12 * np.exp(
                    -0.5 * (np.log2(f[i] / vp["formant"]) / vp["formant_octaves"]) ** 2)
                assert abs(np.fft.rfft(y)[i]) / abs(np.fft.rfft(x)[i]) == pytest.approx(10 ** (db / 20), rel=1e-6)
        else:  # loudness swings at the tremolo rate: 50 ms windows range over more than 2x in RMS
            rms = np.sqrt((y[: n // 800 * 800].reshape(-1, 800) ** 2).mean(1))
            assert rms.max() > 2 * rms.min()
    assert len({round(voice_params(v, 8)["formant"]) for v in range(8)}) == 8
    with pytest.raises(ValueError, match="voices must be >= 0"):
        render_synthetic_audio(2, 0.5, voices=-1)


@pytest.fixture(scope="module")
def speaker_dm(tiny_tokenizer, tiny_audio_tokenizer, tmp_path_factory):
    d = MultimodalDataModule(str(tiny_tokenizer), str(tiny_audio_tokenizer), cache_dir=str(tmp_path_factory.mktemp("spk")),
                             **{**SMALL_DATA, "speakers": VOICES, "speaker_dropout": 0.5})
    d.setup()
    return d


def test_audio_generation_documents_open_with_a_reference_of_the_same_speaker(speaker_dm):
    split = speaker_dm.corpus.splits["train"]
    spk = split["audio_speakers"]
    assert spk.shape == (len(split["audio"]),) and bool((spk >= 0).all())
    for name, dropout in (("train", 0.5), ("val", 0.0)):
        ds = RowDataset(speaker_dm.corpus, name, 8, speaker_dm.seq_len, {"audio_gen": 1.0}, 0.0, speaker_dm.text_len,
                        0, speaker_dropout=dropout)
        data = speaker_dm.corpus.splits[name]
        with_token = without = 0
        for i in range(8):
            g = torch.Generator().manual_seed(i)
            doc, media = ds.document("audio_gen", g)
            if media[0][0] == "speaker":
                with_token += 1
                assert int(doc["kind"][0]) == KINDS["speaker"] and doc["spans"][0] == ("speaker", 0, 1)
                ref, item = media[0][2], media[1][2]
                # the reference: another clip of the same speaker (the clip's codes, looked up in the split)
                ri = next(j for j in range(len(data["audio"])) if torch.equal(data["audio"][j], ref))
                ii = next(j for j in range(len(data["audio"])) if torch.equal(data["audio"][j], item))
                assert int(data["audio_speakers"][ri]) == int(data["audio_speakers"][ii])
                assert ri != ii or int((data["audio_speakers"] == data["audio_speakers"][ii]).sum()) == 1
            else:
                without += 1
                assert int(doc["kind"][0]) == KINDS["text"]
        assert with_token > 0 and (without > 0 if dropout else without == 0)
    # collation: the speaker tokens are their own group, not audio targets
    batch = collate_rows([speaker_dm.datasets["val"][i] for i in range(4)])
    if batch.speakers:
        (s,) = batch.speakers
        assert s.dest.shape == (s.codes.shape[0], 1)
        assert (batch.kind.reshape(-1)[s.dest.reshape(-1)] == KINDS["speaker"]).all()
    # rows are a pure function of (seed, split, index)
    ds = speaker_dm.datasets["train"]
    a, b = ds[3], ds[3]
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["kind"], b["kind"])


def test_data_without_speakers_draws_nothing_for_them(speaker_dm):
    """A corpus without speaker ids (caches written before the option) gives the rows it always gave."""
    import copy

    corpus = copy.copy(speaker_dm.corpus)
    corpus.splits = {k: {kk: vv for kk, vv in v.items() if kk != "audio_speakers"} for k, v in corpus.splits.items()}
    unknown = copy.copy(speaker_dm.corpus)  # ... and one whose sounds have no known speaker
    unknown.splits = {k: {**v, "audio_speakers": torch.full((len(v["audio"]),), -1)} for k, v in corpus.splits.items()}
    weights = {t: 1.0 for t in TASKS}
    rows = [RowDataset(c, "train", 6, 192, weights, 0.1, 48, 0, speaker_dropout=0.5) for c in (corpus, unknown)]
    for i in range(6):
        a, b = rows[0][i], rows[1][i]
        assert torch.equal(a["ids"], b["ids"]) and (a["kind"] != KINDS["speaker"]).all()


def test_bad_speaker_config_names_the_key(tiny_tokenizer, tiny_audio_tokenizer, tmp_path):
    for kw, match in (({"speakers": -1}, "data.speakers"), ({"speaker_dropout": 1.0}, "data.speaker_dropout")):
        with pytest.raises(ValueError, match=match):
            MultimodalDataModule(str(tiny_tokenizer), str(tiny_audio_tokenizer), cache_dir=str(tmp_path), **kw)


def test_training_with_speakers_switches_the_embedding_on_and_generates_in_the_reference_voice(
        tmp_path, tiny_tokenizer, tiny_audio_tokenizer, speaker_dm):
    import generate
    from datamodules.media_io import read_audio, write_audio
    from tools import eval_ernie5

    cache = Path(speaker_dm.cache_dir)
    cfg = cfg_for(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, cache, "trainer.max_steps=2",
                  "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "test=false",
                  f"data.speakers={VOICES}", "data.speaker_dropout=0.5")
    _, objs = train.run(cfg)
    module = objs["model"]
    assert module.net.speaker_enc is not None and module.hparams["net"]["speaker"] is True
    # the audio loss reaches the speaker encoder through the token
    batch = next(b for b in objs["datamodule"].train_dataloader() if b.speakers)
    module.zero_grad(set_to_none=True)
    module._losses(batch, corrupt=False)["terms"]["audio"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.speaker_enc.parameters())
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    # generate.py --reference: a sound file in the voice to speak in
    va = speaker_dm.corpus.splits["val"]
    atok = module.audio_tokenizer
    ref_wav = write_audio(tmp_path / "ref.wav", atok.decode_wave(va["audio"][:1])[0].clamp(-1, 1),
                          int(atok.cfg.sample_rate))
    common = ["--device", "cpu", "--out", str(tmp_path / "samples"), "--task", "audio", "--prompt", "a tone",
              "--seconds", "0.5"]
    (a,) = generate.main([ckpt, *common, "--reference", str(ref_wav)])
    (b,) = generate.main([ckpt, *common, "--reference", str(ref_wav)])
    assert torch.equal(read_audio(a), read_audio(b))  # deterministic under --seed
    with pytest.raises(ValueError, match="--reference gives the voice of --task audio"):
        generate.main([ckpt, "--task", "text", "--prompt", "The", "--device", "cpu", "--reference", str(ref_wav)])
    # eval: a voice probe on real sounds scores the voices the generated sounds were asked for
    res = eval_ernie5.main([ckpt, "--num", "3", "--text-rows", "4"])
    voice = res["generation"]["audio"]["voice"]
    assert set(voice) == {"probe_on_real", "generated", "generated_matches_caption_item", "chance", "nll",
                          "code_information"}
    assert all(0.0 <= v <= 1.0 for k, v in voice.items() if k not in ("nll", "code_information"))
    info = voice["code_information"]
    assert len(info["mi"]) == len(info["code_entropy"]) == atok.cfg.num_quantizers
    assert all(0.0 <= m <= h + 1e-9 for m, h in zip(info["mi"], info["code_entropy"]))
    # teacher-forced: the reference changes the audio NLL (the untrained network already reads it)
    nll = voice["nll"]
    assert set(nll) == {"matched", "other_voice", "none", "by_kind", "n"} and nll["n"] >= 1
    assert all(nll[m] > 0 for m in ("matched", "other_voice", "none"))
    assert nll["matched"] != pytest.approx(nll["none"], abs=1e-6)
    # per kind: each kind's sounds alone; their mean weighted by count is the overall NLL (equal-length sounds)
    from datamodules.captions import caption_fields
    spk = va["audio_speakers"]
    scored = [i for i in range(3) if all(module.reference_clip(va, i, v) is not None
                                         for v in (int(spk[i]), (int(spk[i]) + 1) % VOICES))]
    assert nll["n"] == len(scored)
    kinds = [caption_fields(va["audio_captions"][i][0])["sound"] for i in scored]
    assert set(nll["by_kind"]) == set(kinds)
    for m in ("matched", "other_voice", "none"):
        assert sum(kinds.count(k) * nll["by_kind"][k][m] for k in set(kinds)) / len(kinds) == pytest.approx(nll[m], rel=1e-5)
    kinds = [caption_fields(c[0])["sound"] for c in va["audio_captions"][:3]]
    # --audio-only with a judge: a frame classifier names the kind of decoded sounds, for any tokenizer
    from datamodules.synthetic_audio import AUDIO_CLASSES
    from datamodules.captions import caption_fields
    from models.tokenizers.semantic import AudioFrameClassifier, FrameClassifierConfig

    torch.manual_seed(0)
    judge = AudioFrameClassifier(FrameClassifierConfig(sample_rate=int(atok.cfg.sample_rate), channels=8, dim=8))
    judge_path = tmp_path / "judge.ckpt"
    torch.save({"teacher": {"kind": "frame_classifier", "config": judge.cfg.to_dict()},
                "state_dict": judge.state_dict()}, judge_path)
    res = eval_ernie5.main([ckpt, "--num", "3", "--text-rows", "4", "--audio-only", "--audio-judge", str(judge_path)])
    assert set(res["understanding"]) == set(res["generation"]) == set(res["caption_loss"]) == {"audio"}
    assert res["attribute_ranking"] == {}
    got = res["generation"]["audio"]["judge"]
    assert set(got) == {"on_decoded_real", "generated"} and 0.0 <= got["generated"] <= 1.0
    # by hand on the real held-out sounds: decode, classify each frame, average the logits (Griffin-Lim starts
    # from random phases: the same seed for both decodes)
    truth = [caption_fields(c[0])["sound"] for c in va["audio_captions"][:3]]
    torch.manual_seed(0)
    got = eval_ernie5.judge_sounds(judge.eval(), atok, va["audio"][:3], va["audio"][:3], [{"kind": t} for t in truth])
    torch.manual_seed(0)
    named = judge(atok.decode_wave(va["audio"][:3])).mean(1).argmax(-1)
    assert got["on_decoded_real"] == pytest.approx(
        sum(AUDIO_CLASSES[int(i)] == t for i, t in zip(named, truth)) / 3)
    # --voice-judge: a frame classifier of the voices names the voice of decoded real and generated sounds
    vjudge = AudioFrameClassifier(FrameClassifierConfig(sample_rate=int(atok.cfg.sample_rate), channels=8, dim=8,
                                                        num_classes=VOICES))
    torch.save({"teacher": {"kind": "frame_classifier", "config": vjudge.cfg.to_dict()},
                "state_dict": vjudge.state_dict()}, tmp_path / "voice.ckpt")
    res = eval_ernie5.main([ckpt, "--num", "3", "--text-rows", "4", "--audio-only", "--voice-judge",
                            str(tmp_path / "voice.ckpt")])
    vj = res["generation"]["audio"]["voice"]["judge"]
    assert set(vj["by_kind"]) == set(kinds) and sum(v["n"] for v in vj["by_kind"].values()) == 3
    assert all(0.0 <= vj[k] <= 1.0 for k in ("on_decoded_real", "generated"))
    # by hand (Griffin-Lim starts from random phases: the same seed for both decodes)
    own = [int(x) for x in va["audio_speakers"][:3]]
    asked = [(v + 1) % VOICES for v in own]
    codes = va["audio"][:3]
    torch.manual_seed(0)
    got = eval_ernie5.judge_voices(vjudge.eval(), atok, codes, own, codes, asked, kinds)
    torch.manual_seed(0)
    named = [int(i) for i in vjudge(atok.decode_wave(codes)).mean(1).argmax(-1)]
    assert got["on_decoded_real"] == pytest.approx(sum(a == b for a, b in zip(named, own)) / 3)
    for k in set(kinds):
        sel = [i for i in range(3) if kinds[i] == k]
        assert got["by_kind"][k]["on_decoded_real"] == pytest.approx(sum(named[i] == own[i] for i in sel) / len(sel))
    with pytest.raises(ValueError, match="--voice-judge names 5 classes, the corpus has 3 voices"):
        eval_ernie5.main([ckpt, "--num", "1", "--audio-only", "--voice-judge", str(judge_path)])
    with pytest.raises(ValueError, match="takes 8000 Hz audio"):
        torch.save({"teacher": {"kind": "frame_classifier", "config": {**judge.cfg.to_dict(), "sample_rate": 8000}},
                    "state_dict": judge.state_dict()}, tmp_path / "judge8k.ckpt")
        eval_ernie5.main([ckpt, "--num", "1", "--audio-only", "--audio-judge", str(tmp_path / "judge8k.ckpt")])


def test_speaker_data_with_model_net_speaker_false_is_an_error(tmp_path, tiny_tokenizer, tiny_audio_tokenizer,
                                                                speaker_dm):
    cfg = cfg_for(tmp_path, tiny_tokenizer, tiny_audio_tokenizer, Path(speaker_dm.cache_dir), "trainer.max_steps=1",
                  "trainer.limit_val_batches=0", "test=false", f"data.speakers={VOICES}", "model.net.speaker=false",
                  "data.task_weights={audio_gen: 1.0}")
    with pytest.raises(ValueError, match="model.net.speaker=false"):
        train.run(cfg)


def test_audio_tokenizer_data_renders_the_voices_ernie5_asks_for(monkeypatch, tmp_path):
    """`data.speakers` on the audio DataModule renders the same voiced clips as the multimodal corpus, and
    ERNIE 5.0's `requires` passes its own `data.speakers` to the audio tokenizer build (only when on, so
    the default build's fingerprint is unchanged)."""
    from omegaconf import OmegaConf, open_dict

    import tools.artifacts as artifacts
    from datamodules.media import AudioDataModule

    voiced = AudioDataModule(clip_seconds=0.5, num_clips=12, speakers=VOICES)
    plain = AudioDataModule(clip_seconds=0.5, num_clips=12)
    want, labels, _ = render_synthetic_audio(12, 0.5, seed=0, voices=VOICES)
    groups, group_labels, _ = voiced._synthetic_groups()
    assert torch.equal(torch.cat(groups), want) and group_labels == labels.tolist()
    assert not torch.equal(torch.cat(plain._synthetic_groups()[0]), want)
    assert torch.equal(torch.cat(plain._synthetic_groups()[0]), render_synthetic_audio(12, 0.5, seed=0)[0])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="data.speakers must be an integer"):
            AudioDataModule(speakers=bad)
    with pytest.raises(ValueError, match="data.speakers=2 .* data.source"):
        AudioDataModule(source=str(tmp_path), speakers=2)

    built = []
    monkeypatch.setattr(artifacts, "_build_once", lambda target, build, what, fp: built.append(what) or target)
    for speakers in (0, 4):
        cfg = artifacts.compose(["experiment=ernie5", f"data.speakers={speakers}",
                                 f"paths.artifacts_dir={tmp_path}", "data.visual_tokenizer=v.ckpt"])
        with open_dict(cfg):  # a parent with no debug mode and a cpu trainer, whatever another test left
            cfg.hydra = OmegaConf.create({"runtime": {"choices": {}}})
        artifacts.ensure_requirements(cfg)
    assert built == ["experiment=audio_tokenizer", "experiment=audio_tokenizer data.speakers=4"]


def test_audio_labels_name_the_voice_or_the_sound_and_voice(tmp_path):
    """`data.labels` = voice / class_voice labels each synthetic clip with the voice it was rendered in (as its
    params record it) or with one label per (sound, voice) pair; `audio_label_count` gives the count the
    audio teacher's head needs, and bad values name their keys."""
    from datamodules.media import AudioDataModule, audio_label_count

    params = audio_params(24, 0.25, seed=0, voices=VOICES)
    by_kind = {"class": [p["label"] for p in params], "voice": [p["voice"] for p in params],
               "class_voice": [p["label"] * VOICES + p["voice"] for p in params]}
    for kind, want in by_kind.items():
        dm = AudioDataModule(clip_seconds=0.25, num_clips=24, speakers=VOICES, labels=kind)
        waves, labels, names = dm._synthetic_groups()
        assert labels == want and len(names) == audio_label_count(kind, 5, VOICES)
        assert max(labels) < len(names)
    assert names[VOICES + 1] == "chord/voice1"  # class 1 (chord), voice 1
    assert len(set(by_kind["class_voice"])) > 5  # the pairs are not the classes again
    assert audio_label_count("class", 3, 0) == 3 and audio_label_count("class_voice", 3, 4) == 12
    with pytest.raises(ValueError, match="data.labels must be one of"):
        AudioDataModule(labels="speaker")
    with pytest.raises(ValueError, match="data.labels='voice' .* data.speakers >= 1"):
        AudioDataModule(labels="voice")
    with pytest.raises(ValueError, match="data.labels='class_voice' .* data.speakers >= 1"):
        AudioDataModule(source=str(tmp_path), labels="class_voice")


def test_a_voice_teacher_trains_on_sound_and_voice_labels(tmp_path):
    """`experiment=audio_teacher data.labels=class_voice data.speakers=N` sizes its head by the resolver
    (5 x N classes) and trains on the pair labels; the semantic codec's teacher build inherits both keys."""
    from lit_modules.audio_teacher import AudioTeacherModule

    cfg = compose_train_cfg(["experiment=audio_teacher", f"data.speakers={VOICES}", "data.labels=class_voice",
                             "data.num_clips=24", "data.batch_size=8", "data.clip_seconds=0.25", "trainer.max_steps=2",
                             "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.net.channels=8",
                             "model.net.dim=8", "test=false", "logger=csv", "extras.print_config=false",
                             "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false"], tmp_path)
    assert cfg.model.net.num_classes == 5 * VOICES
    metrics, objs = train.run(cfg)
    module: AudioTeacherModule = objs["model"]
    assert module.net_cfg.num_classes == 5 * VOICES and "val/clip_acc" in metrics
    batch = next(iter(objs["datamodule"].train_dataloader()))
    assert int(batch.labels.max()) < 5 * VOICES
    semantic = compose_train_cfg(["experiment=audio_tokenizer_semantic"], tmp_path / "sem")
    assert {"data.speakers", "data.labels"} <= set(semantic.requires["model.semantic.teacher"].inherit)
