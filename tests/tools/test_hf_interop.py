"""tools/export_hf.py and tools/import_hf.py against transformers: same logits, same greedy continuation,
same token ids, exact tensor round trips, and clear refusals of what HF cannot express."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lit_modules.lm import tokenizer_to_state  # noqa: E402
from models.tokenizers.text import BPETokenizer, ByteTokenizer  # noqa: E402
from models.transformer import Transformer, TransformerConfig  # noqa: E402
from tools.export_hf import export_hf, load_lm_checkpoint, main as export_main  # noqa: E402
from tools.hf_format import NotRepresentable, hf_state, our_state, read_safetensors, write_safetensors  # noqa: E402
from tools.import_hf import import_hf  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures"
TEXT = ["Mira Okafor was born in Lagos.", "She studied physics at Leeds.", "Tomas Berg works as a baker in Oslo.",
        "Ana Lima lives in Porto and paints."] * 4
SAMPLES = ["Mira Okafor was born in Lagos.", "héllo wörld 👋 <eos> <pad>\n\ttabs  and   spaces", ""]


def _tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _save_lm(path: Path, net: dict, tokenizer, seed: int = 0) -> Path:
    """A checkpoint as the LM module writes it (state_dict under `model.`, hyper_parameters.net, tokenizer)."""
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig.from_dict(json.loads(json.dumps(net))))
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"net": net}, "tokenizer": tokenizer_to_state(tokenizer)}, path)
    return path


def _ours(ckpt: Path) -> Transformer:
    cfg, state, _ = load_lm_checkpoint(ckpt)
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    return model


def _hf(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _assert_same_model(ours: Transformer, hf, vocab: int) -> None:
    x = _tokens(vocab)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)
        hf.generation_config.eos_token_id = None  # ours runs all max_new_tokens too
        greedy = hf.generate(x[:, :4], attention_mask=torch.ones_like(x[:, :4]), max_new_tokens=8, do_sample=False)
        assert torch.equal(greedy, ours.generate(x[:, :4], 8, temperature=0.0))


def _assert_same_tokenizer(folder: Path, ours) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES:
        ids = ours.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok(text)["input_ids"] == [ours.eos_id] + ids  # generate.py's prompt format: <eos> as BOS
        assert tok.decode(ids) == ours.decode(ids)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (ours.eos_id, ours.pad_id, ours.eos_id)


def _moe_net(vocab: int, **moe) -> dict:
    return dict(preset="tiny", vocab_size=vocab, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64,
                tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-6, ffn="moe",
                moe=dict(num_experts=4, top_k=2, expert_hidden=16, **moe))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=300, min_frequency=1)


def test_dense_lm_exports_to_llama_with_the_same_logits_generation_and_tokens(tmp_path):
    """The dense fixture (grouped-query attention, tied embeddings, byte tokenizer) as a LlamaForCausalLM."""
    out = tmp_path / "hf"
    res = export_hf(FIX / "lm.ckpt", out)
    assert res["architecture"] == "LlamaForCausalLM" and res["tokenizer"]
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    hf = _hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    _assert_same_model(_ours(FIX / "lm.ckpt"), hf, 258)
    _assert_same_tokenizer(out, ByteTokenizer())


@pytest.mark.parametrize("moe, arch", [
    (dict(), "MixtralForCausalLM"),  # softmax, top-k renormalised, no shared experts
    (dict(renormalize=False), "Qwen2MoeForCausalLM"),  # norm_topk_prob=false, zero shared expert
    (dict(num_shared=2, shared_hidden=8, renormalize=False), "Qwen2MoeForCausalLM"),  # zero gate, doubled down proj
])
def test_moe_lm_exports_to_the_matching_architecture(tmp_path, bpe, moe, arch):
    ckpt = _save_lm(tmp_path / "moe.ckpt", _moe_net(bpe.vocab_size, **moe), bpe)
    res = export_hf(ckpt, tmp_path / "hf")
    assert res["architecture"] == arch
    hf = _hf(tmp_path / "hf")
    assert type(hf).__name__ == arch
    _assert_same_model(_ours(ckpt), hf, bpe.vocab_size)
    _assert_same_tokenizer(tmp_path / "hf", bpe)


def test_trained_moe_fixture_with_shared_experts_matches_qwen2_moe(tmp_path):
    export_hf(FIX / "moe.ckpt", tmp_path / "hf")
    _assert_same_model(_ours(FIX / "moe.ckpt"), _hf(tmp_path / "hf"), 258)


@pytest.mark.parametrize("name", ["lm", "moe"])
def test_import_then_export_round_trips_every_tensor_exactly(tmp_path, name):
    from generate import load_module
    from lit_modules.lm import LanguageModelModule

    export_hf(FIX / f"{name}.ckpt", tmp_path / "a")
    res = import_hf(tmp_path / "a", tmp_path / "imported.ckpt")
    cfg0, s0, _ = load_lm_checkpoint(FIX / f"{name}.ckpt")
    cfg1, s1, ckpt = load_lm_checkpoint(tmp_path / "imported.ckpt")
    assert cfg1 == cfg0  # the recorded training knobs come back too
    assert s1.keys() == s0.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert ckpt["hyper_parameters"]["net"] == res["net"]
    export_hf(tmp_path / "imported.ckpt", tmp_path / "b")
    a, b = read_safetensors(tmp_path / "a" / "model.safetensors"), read_safetensors(tmp_path / "b" / "model.safetensors")
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()

    module = load_module(tmp_path / "imported.ckpt", "cpu")  # what generate.py does
    assert isinstance(module.tokenizer, ByteTokenizer)
    x = _tokens(258)
    with torch.no_grad():
        ref = _ours(FIX / f"{name}.ckpt")(x)
        torch.testing.assert_close(module.model(x), ref, atol=0, rtol=0)
        assert module.generate_text(["Mira"], max_new_tokens=6, temperature=0.0)[0].startswith("Mira")
        fresh = LanguageModelModule(net=res["net"], init_ckpt=str(tmp_path / "imported.ckpt"))  # model.init_ckpt
        fresh.configure_model()
        torch.testing.assert_close(fresh.model(x), ref, atol=0, rtol=0)


def test_bpe_tokenizer_round_trips_through_the_hf_folder(tmp_path, bpe):
    ckpt = _save_lm(tmp_path / "m.ckpt", _moe_net(bpe.vocab_size), bpe)
    export_hf(ckpt, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back.ckpt")
    from lit_modules.lm import tokenizer_from_state

    back = tokenizer_from_state(torch.load(tmp_path / "back.ckpt", weights_only=True)["tokenizer"])
    assert isinstance(back, BPETokenizer) and back == bpe  # same fingerprint: the BOS template is removed again


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_import_of_a_transformers_model_computes_its_logits(tmp_path, arch):
    """Folders written by transformers itself (random tiny models, no tokenizer)."""
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=24, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=500000.0))
    else:
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    hf.save_pretrained(tmp_path / "hf")
    res = import_hf(tmp_path / "hf", tmp_path / "x.ckpt")
    assert not res["tokenizer"] and res["net"]["ffn"] == ("dense" if arch == "llama" else "moe")
    _assert_same_model(_ours(tmp_path / "x.ckpt"), hf.eval(), 64)


def test_fused_expert_layout_reads_like_the_per_expert_one(tmp_path):
    """transformers >= 5 keeps experts fused in memory (gate_up_proj [E, 2H, D], down_proj [E, D, H])."""
    cfg, state, _ = load_lm_checkpoint(_save_lm(tmp_path / "m.ckpt", _moe_net(50), ByteTokenizer()))
    per_expert = hf_state(state, cfg, "mixtral")
    fused = {}
    for key, value in per_expert.items():
        if ".experts." not in key:
            fused[key.replace(".block_sparse_moe.", ".mlp.")] = value
    for i in range(cfg.n_layers):
        x = f"model.layers.{i}.block_sparse_moe.experts."
        w = {n: torch.stack([per_expert[f"{x}{e}.{n}.weight"] for e in range(4)]) for n in ("w1", "w2", "w3")}
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"]
    back = our_state(fused, cfg.to_dict(), "mixtral")
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_what_hf_cannot_express_is_refused_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "hf"
    with pytest.raises(NotRepresentable, match="ffn=moue"):
        export_hf(FIX / "moue.ckpt", out)
    with pytest.raises(SystemExit):
        export_main([str(FIX / "moue.ckpt"), str(out)])
    assert "Mixture of Universal Experts" in capsys.readouterr().err
    for moe, match in [(dict(gate="sigmoid"), "gate='sigmoid'"), (dict(capacity_factor=1.25), "capacity dropping")]:
        with pytest.raises(NotRepresentable, match=match):
            export_hf(_save_lm(tmp_path / "x.ckpt", _moe_net(258, **moe), ByteTokenizer()), out)
    ckpt = torch.load(_save_lm(tmp_path / "b.ckpt", _moe_net(258, bias_balancing=True), ByteTokenizer()), weights_only=True)
    ckpt["state_dict"]["model.trunk.layers.1.ffn.router.expert_bias"][2] = 0.01
    torch.save(ckpt, tmp_path / "b.ckpt")
    with pytest.raises(NotRepresentable, match="layer 1: the router's aux-loss-free balancing bias"):
        export_hf(tmp_path / "b.ckpt", out)
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {}}, "video_tokenizer": {}}, tmp_path / "v.ckpt")
    with pytest.raises(NotRepresentable, match="VideoAR checkpoint"):
        export_hf(tmp_path / "v.ckpt", out)
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {}}, "ernie3_knobs": {}}, tmp_path / "e.ckpt")
    with pytest.raises(NotRepresentable, match="ERNIE 3.0 checkpoint"):
        export_hf(tmp_path / "e.ckpt", out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    export_hf(FIX / "lm.ckpt", out)
    with pytest.raises(FileExistsError, match="--force"):
        export_hf(FIX / "lm.ckpt", out)


def test_import_refuses_what_our_lm_cannot_compute(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, qkv_bias=False)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path / "qwen")  # a learned (non-zero) shared-expert gate
    with pytest.raises(NotRepresentable, match="shared_expert_gate.weight is non-zero"):
        import_hf(tmp_path / "qwen", tmp_path / "q.ckpt")
    export_hf(FIX / "lm.ckpt", tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    for key, value, match in [("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type=default"),
                              ("model_type", "gpt2", "model_type='gpt2' is not supported"),
                              ("head_dim", 4, "head_dim=4"), ("attention_bias", True, "attention_bias")]:
        (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(NotRepresentable, match=match):
            import_hf(tmp_path / "lm", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "q.ckpt").exists()


def test_safetensors_files_agree_with_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16), "c": torch.arange(7),
               "d": torch.zeros(0, 3), "e": torch.randn(2, 2, 2).half()}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = safetensors_torch.load_file(tmp_path / "ours.safetensors")
    assert theirs.keys() == tensors.keys() and all(torch.equal(theirs[k], tensors[k]) for k in tensors)
    safetensors_torch.save_file(tensors, tmp_path / "lib.safetensors")
    ours = read_safetensors(tmp_path / "lib.safetensors")
    assert all(ours[k].dtype == tensors[k].dtype and torch.equal(ours[k], tensors[k]) for k in tensors)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_safetensors(tmp_path / "bad.safetensors")
