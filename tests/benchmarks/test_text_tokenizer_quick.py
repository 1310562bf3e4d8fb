"""The text tokenizer benchmark runs end to end and reports what it says (no timing asserted)."""

from benchmarks import text_tokenizer


def test_text_tokenizer_benchmark_quick(capsys):
    out = text_tokenizer.main(["--quick", "--repeats", "2"])
    assert set(out["tokenizers"]) == {"bpe", "char_bpe"}
    for res in out["tokenizers"].values():
        t = res["tokens_per_char"]
        assert 0 < t["p=0.0"] <= t["p=0.1"] <= t["p=0.3"] <= 1.0
        assert res["segmentations_of_one_sentence_8_seeds_p0.1"] >= 1
        assert res["merge_loop_over_library_time"] > 0 and res["aa_ratio"] > 0
    cjk = out["tokenizers"]["char_bpe"]["foreign_text"]["cjk"]
    # every CJK character is outside a biography alphabet: 2 UTF-16BE bytes each, 3 in UTF-8
    assert cjk["outside_alphabet"] == cjk["chars"]
    assert (cjk["tokens_utf16be_fallback"], cjk["tokens_if_utf8_fallback"]) == (2 * cjk["chars"], 3 * cjk["chars"])
    assert '"tokenizers"' in capsys.readouterr().out
