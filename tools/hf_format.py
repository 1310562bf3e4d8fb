"""What tools/export_hf.py and tools/import_hf.py share: the safetensors format, the name and layout map
between our LM and the Hugging Face architectures it matches, and the tokenizer files.

Architectures (transformers' `model_type`), chosen so that the forward pass is the same function:
  * `llama`     <- ffn=dense: pre-norm RMSNorm blocks, GQA attention with half-split RoPE, SwiGLU;
  * `mixtral`   <- ffn=moe, softmax gates, top-k renormalised, no shared experts;
  * `qwen2_moe` <- ffn=moe otherwise (shared experts and / or top-k not renormalised: `norm_topk_prob`).
    Its shared expert is scaled by sigmoid(shared_expert_gate(x)); ours is not gated, so the gate is
    written as zeros (sigmoid(0) = 1/2) and the shared down projection doubled: scaling by powers of
    two is exact in floating point, so the output is bit-for-bit ours. Without shared experts the
    shared expert is a width-1 zero MLP (adds exactly 0).
Everything else (MoUE, sigmoid gates, aux-loss-free router biases that steer selection, capacity
dropping, 3-axis rotary positions, a head size other than d_model / n_heads, ...) has no equivalent
there and is refused with an error saying what.

Layout notes: our attention fuses q | k | v rows into `wqkv`; routed experts are stacked,
w13 [E, D, 2H] (gate columns then up columns) and w2 [E, H, D], i.e. the transposes of the per-expert
`nn.Linear` weights transformers stores. Tensors are written in the Hub's per-expert layout
(`experts.{j}.w1|w2|w3` for Mixtral, `experts.{j}.gate_proj|up_proj|down_proj` for Qwen2-MoE), which
every transformers version loads; the fused layout transformers >= 5 keeps in memory
(`experts.gate_up_proj` [E, 2H, D], `experts.down_proj` [E, D, H]) is read too.

safetensors is read and written here (a JSON header and raw little-endian tensors) so the tools need no
extra package; `safetensors` and `transformers` are only needed by the tests that check the files.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Optional

import torch

from models.io import atomic_write

__all__ = ["ARCHITECTURES", "NotRepresentable", "hf_config", "hf_state", "net_from_hf_config", "our_state",
           "read_safetensors", "write_safetensors"]

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class NotRepresentable(ValueError):
    """The model uses a feature the target format cannot express."""


# ----------------------------------------------------------------------------------------- safetensors


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> Path:
    """Write `tensors` as one safetensors file, atomically (models.io.atomic_write)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer runs on little-endian hosts only")
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors code")
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        blobs.append(t)
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for t in blobs:
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    return atomic_write(path, write)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (copied into memory), in header order."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            start = 8 + n
            out = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _TORCH_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name}: unsupported dtype {info['dtype']}")
                a, b = info["data_offsets"]
                f.seek(start + a)
                data = bytearray(f.read(b - a))
                if len(data) != b - a:
                    raise ValueError(f"tensor {name}: file truncated")
                t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                out[name] = t.view(dtype).reshape(info["shape"])
    except (OSError, struct.error, json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    return out


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"cannot read {index}: {e}") from e
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists tensors its shards lack: {missing[:5]}")
        return state
    if any(folder.glob("*.bin")):
        raise ValueError(f"{folder} holds pytorch_model*.bin weights only; save them as safetensors first "
                         "(model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json")


# ----------------------------------------------------------------------------------------- config


def check_representable(cfg) -> str:
    """The model_type our TransformerConfig `cfg` maps onto, or NotRepresentable naming what does not fit."""
    if cfg.ffn == "moue":
        raise NotRepresentable("model.net.ffn=moue (a Mixture of Universal Experts: one expert pool shared across "
                               "layers with a trajectory router) has no Hugging Face architecture; convert only "
                               "dense or moe language models")
    if cfg.ffn == "dense":
        return "llama"
    moe = cfg.moe
    if moe.gate != "softmax":
        raise NotRepresentable(f"model.net.moe.gate={moe.gate!r}: Mixtral / Qwen2-MoE routers use softmax gates")
    if moe.capacity_factor is not None:
        raise NotRepresentable(f"model.net.moe.capacity_factor={moe.capacity_factor}: capacity dropping has no "
                               "equivalent (Hugging Face MoE layers are dropless); export a dropless model")
    return "mixtral" if moe.num_shared == 0 and moe.renormalize else "qwen2_moe"


def hf_config(cfg, model_type: str, tokenizer=None, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for our TransformerConfig `cfg`."""
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if model_type == "llama":
        out.update(intermediate_size=cfg.ffn_hidden, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mixtral":
        out.update(intermediate_size=cfg.moe.expert_hidden, num_local_experts=cfg.moe.num_experts,
                   num_experts_per_tok=cfg.moe.top_k, router_aux_loss_coef=cfg.moe.aux_loss_coef,
                   router_jitter_noise=0.0, output_router_logits=False, sliding_window=None)
    else:
        out.update(intermediate_size=cfg.moe.expert_hidden, moe_intermediate_size=cfg.moe.expert_hidden,
                   num_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                   norm_topk_prob=cfg.moe.renormalize, shared_expert_intermediate_size=_shared_hidden(cfg) or 1,
                   decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False, router_aux_loss_coef=cfg.moe.aux_loss_coef,
                   output_router_logits=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.n_layers, layer_types=["full_attention"] * cfg.n_layers)
    return out


def _shared_hidden(cfg) -> int:
    return cfg.moe.num_shared * (cfg.moe.shared_hidden or cfg.moe.expert_hidden) if cfg.moe.num_shared else 0


_DEFAULTS = {  # transformers' config defaults for fields a config.json may leave out
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
}


def net_from_hf_config(c: dict, where: str = "config.json") -> dict:
    """Our model.net (TransformerConfig fields) for a transformers config.json, or an error naming the key
    that has no equivalent."""
    model_type = c.get("model_type")
    if model_type not in ARCHITECTURES:
        raise NotRepresentable(f"{where}: model_type={model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")

    def need(key):
        if key not in c:
            raise ValueError(f"{where}: missing key {key!r}")
        return c[key]

    def refuse(key, why):
        raise NotRepresentable(f"{where}: {key}={c.get(key)!r} is not representable: {why}")

    d = _DEFAULTS[model_type]
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "our FFNs are SwiGLU (silu)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        refuse("rope_parameters" if "rope_parameters" in c else "rope_scaling", "only plain RoPE (rope_type=default) is")
    if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
        refuse("partial_rotary_factor", "every head channel is rotated here")
    theta = rope.get("rope_theta", c.get("rope_theta", d["rope_theta"]))
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            refuse(key, "our projections have no biases")
    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if c.get("head_dim") not in (None, d_model // n_heads) or d_model % n_heads:
        refuse("head_dim", f"the head size must be hidden_size / num_attention_heads = {d_model / n_heads:g}")
    if c.get("sliding_window") is not None and (model_type == "mixtral" or c.get("use_sliding_window")):
        refuse("sliding_window", "attention here is full causal")
    if any(t != "full_attention" for t in c.get("layer_types") or []):
        refuse("layer_types", "every layer attends fully (no sliding-window layers)")
    net = dict(
        preset="tiny", vocab_size=int(need("vocab_size")), n_layers=int(need("num_hidden_layers")), d_model=d_model,
        n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        max_seq_len=int(c.get("max_position_embeddings", d["max_position_embeddings"])),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), rope_theta=float(theta),
        norm_eps=float(c.get("rms_norm_eps", d["rms_norm_eps"])), init_std=float(c.get("initializer_range", 0.02)),
        dropout=0.0,
    )
    if model_type == "llama":
        return {**net, "ffn": "dense", "ffn_hidden": int(need("intermediate_size"))}
    moe = {"gate": "softmax", "capacity_factor": None}
    if "router_aux_loss_coef" in c:
        moe["aux_loss_coef"] = float(c["router_aux_loss_coef"])
    if model_type == "mixtral":
        moe.update(num_experts=int(need("num_local_experts")), top_k=int(need("num_experts_per_tok")),
                   expert_hidden=int(need("intermediate_size")), renormalize=True, num_shared=0)
    else:
        if int(c.get("decoder_sparse_step", 1)) != 1 or c.get("mlp_only_layers"):
            refuse("mlp_only_layers" if c.get("mlp_only_layers") else "decoder_sparse_step",
                   "every layer is an MoE layer here (no dense layers between them)")
        moe.update(num_experts=int(need("num_experts")), top_k=int(need("num_experts_per_tok")),
                   expert_hidden=int(need("moe_intermediate_size")), renormalize=bool(c.get("norm_topk_prob", False)),
                   num_shared=1, shared_hidden=int(need("shared_expert_intermediate_size")))
    return {**net, "ffn": "moe", "moe": moe}


# ----------------------------------------------------------------------------------------- tensors


def hf_state(state: dict[str, torch.Tensor], cfg, model_type: str) -> dict[str, torch.Tensor]:
    """Our Transformer state dict (current names) -> transformers tensors (names and layouts)."""
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["trunk.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, hf = f"trunk.layers.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.wqkv.weight"].split([H * D, K * D, K * D], dim=0)
        out.update({
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.wo.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "ffn_norm.weight"],
        })
        f = ours + "ffn."
        if model_type == "llama":
            out.update({hf + "mlp.gate_proj.weight": state[f + "w1.weight"], hf + "mlp.up_proj.weight": state[f + "w3.weight"],
                        hf + "mlp.down_proj.weight": state[f + "w2.weight"]})
            continue
        bias = state.get(f + "router.expert_bias")
        if cfg.moe.bias_balancing and bias is not None and bool(bias.any()):
            raise NotRepresentable(
                f"layer {i}: the router's aux-loss-free balancing bias (model.net.moe.bias_balancing) is non-zero and "
                "steers expert selection; Mixtral / Qwen2-MoE routers have no selection bias")
        w13, w2 = state[f + "experts.w13"], state[f + "experts.w2"]
        Eh = cfg.moe.expert_hidden
        moe = hf + ("block_sparse_moe." if model_type == "mixtral" else "mlp.")
        names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        out[moe + "gate.weight"] = state[f + "router.weight"]
        for e in range(cfg.moe.num_experts):
            x = f"{moe}experts.{e}."
            out[x + names[0] + ".weight"] = w13[e, :, :Eh].t()
            out[x + names[1] + ".weight"] = w13[e, :, Eh:].t()
            out[x + names[2] + ".weight"] = w2[e].t()
        if model_type == "qwen2_moe":
            s = moe + "shared_expert."
            if cfg.moe.num_shared:
                out.update({s + "gate_proj.weight": state[f + "shared.w1.weight"],
                            s + "up_proj.weight": state[f + "shared.w3.weight"],
                            s + "down_proj.weight": state[f + "shared.w2.weight"] * 2})  # x2 (exact): the gate gives 1/2
            else:
                z = state[f + "router.weight"].new_zeros
                out.update({s + "gate_proj.weight": z(1, cfg.d_model), s + "up_proj.weight": z(1, cfg.d_model),
                            s + "down_proj.weight": z(cfg.d_model, 1)})
            out[moe + "shared_expert_gate.weight"] = state[f + "router.weight"].new_zeros(1, cfg.d_model)
    return {k: v.contiguous() for k, v in out.items()}


def our_state(hf: dict[str, torch.Tensor], net: dict, model_type: str,
              where: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """transformers tensors -> our Transformer state dict; every tensor of `hf` must be used."""
    from models.transformer import TransformerConfig

    cfg = TransformerConfig.from_dict(_copy(net))
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"{where}: missing tensor {key!r}")
        used.add(key)
        return hf[key]

    def zero(key: str, why: str) -> None:
        if key in hf and bool(take(key).any()):
            raise NotRepresentable(f"{where}: {key} is non-zero: {why}")

    out = {"tok_emb.weight": take("model.embed_tokens.weight"), "trunk.norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        if "lm_head.weight" in hf and not torch.equal(take("lm_head.weight"), out["tok_emb.weight"]):
            raise ValueError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        ours, p = f"trunk.layers.{i}.", f"model.layers.{i}."
        for b in ("q", "k", "v", "o"):
            zero(f"{p}self_attn.{b}_proj.bias", "our attention projections have no biases")
        out.update({
            ours + "attn_norm.weight": take(p + "input_layernorm.weight"),
            ours + "attn.wqkv.weight": torch.cat([take(p + f"self_attn.{b}_proj.weight") for b in "qkv"], dim=0),
            ours + "attn.wo.weight": take(p + "self_attn.o_proj.weight"),
            ours + "ffn_norm.weight": take(p + "post_attention_layernorm.weight"),
        })
        f = ours + "ffn."
        if model_type == "llama":
            out.update({f + "w1.weight": take(p + "mlp.gate_proj.weight"), f + "w3.weight": take(p + "mlp.up_proj.weight"),
                        f + "w2.weight": take(p + "mlp.down_proj.weight")})
            continue
        moe = p + "mlp."
        if model_type == "mixtral" and f"{p}block_sparse_moe.gate.weight" in hf:
            moe = p + "block_sparse_moe."
        names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        router = take(moe + "gate.weight")
        out[f + "router.weight"] = router
        out[f + "router.expert_bias"] = torch.zeros(cfg.moe.num_experts, dtype=torch.float32)
        E = cfg.moe.num_experts
        if moe + "experts.gate_up_proj" in hf:  # transformers >= 5 in-memory layout
            gate_up, down = take(moe + "experts.gate_up_proj"), take(moe + "experts.down_proj")
            out[f + "experts.w13"] = gate_up.transpose(1, 2)
            out[f + "experts.w2"] = down.transpose(1, 2)
        else:
            x = [f"{moe}experts.{e}." for e in range(E)]
            w1 = torch.stack([take(x[e] + names[0] + ".weight") for e in range(E)])
            w3 = torch.stack([take(x[e] + names[1] + ".weight") for e in range(E)])
            out[f + "experts.w13"] = torch.cat([w1, w3], dim=1).transpose(1, 2)
            out[f + "experts.w2"] = torch.stack([take(x[e] + names[2] + ".weight") for e in range(E)]).transpose(1, 2)
        if model_type == "qwen2_moe":
            zero(moe + "shared_expert_gate.weight",
                 "the shared expert is gated by sigmoid(shared_expert_gate(x)), which varies per token; ours is ungated "
                 "(only a zero gate, a constant 1/2, has an equivalent)")
            take(moe + "shared_expert_gate.weight")
            s = moe + "shared_expert."
            if cfg.moe.num_shared:
                out.update({f + "shared.w1.weight": take(s + "gate_proj.weight"),
                            f + "shared.w3.weight": take(s + "up_proj.weight"),
                            f + "shared.w2.weight": take(s + "down_proj.weight") / 2})  # exact: undoes the gate's 1/2
            else:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    zero(f"{s}{name}.weight", "the config has no shared expert")
    unused = sorted(set(hf) - used)
    if unused:
        raise NotRepresentable(f"{where}: tensors with no counterpart here: {unused[:8]}"
                               f"{' ...' if len(unused) > 8 else ''}")
    return {k: v.contiguous() for k, v in out.items()}


def _copy(d):
    return json.loads(json.dumps(d))


def shared_experts_are_zero(hf: dict[str, torch.Tensor], n_layers: int) -> bool:
    """A Qwen2-MoE checkpoint whose shared experts all output 0 (what an export without shared experts writes)."""
    keys = [f"model.layers.{i}.mlp.shared_expert.{n}.weight" for i in range(n_layers)
            for n in ("gate_proj", "up_proj", "down_proj")]
    return all(k in hf for k in keys) and not any(bool(hf[k].any()) for k in keys)


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Every expected tensor present with its shape, nothing extra."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: tensors missing {missing[:8]}, unexpected {extra[:8]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}")



# ----------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of `tokenizers`' ByteLevel pre-tokenizer."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` equal to our ByteTokenizer: UTF-8 byte b -> id b, <eos> = 256, <pad> = 257
    (byte-level BPE without merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as hf_models

    from models.tokenizers.text import EOS_TOKEN, PAD_TOKEN

    table = _bytes_to_unicode()
    tok = Tokenizer(hf_models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True), AddedToken(PAD_TOKEN, special=True)])
    return tok


def _bos_template(tok, eos_id: int):
    from tokenizers import processors

    from models.tokenizers.text import EOS_TOKEN

    return processors.TemplateProcessing(single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
                                         special_tokens=[(EOS_TOKEN, eos_id)])


def hf_tokenizer_files(tokenizer, max_len: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for our text tokenizer.

    Encoding without special tokens gives our ids; with them (transformers' default) <eos> is prepended
    as BOS, the prompt format generate.py uses. Literal "<eos>" in text stays text (split_special_tokens).
    """
    from tokenizers import Tokenizer

    from models.tokenizers.text import EOS_TOKEN, PAD_TOKEN, BPETokenizer, ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        tok = byte_level_tokenizer()
    elif isinstance(tokenizer, BPETokenizer):
        tok = Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    else:
        raise NotRepresentable(f"tokenizer {type(tokenizer).__name__} has no Hugging Face form")
    tok.post_processor = _bos_template(tok, tokenizer.eos_id)
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "split_special_tokens": True,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_len, "sparse_ar_lab_tokenizer": tokenizer.kind}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2)}


def tokenizer_from_hf(folder: Path):
    """Our text tokenizer from folder/tokenizer.json (None if there is none).

    An exported byte tokenizer comes back as a ByteTokenizer; any other needs the <eos> and <pad> special
    tokens our BPETokenizer uses. The BOS template export_hf adds is removed (ours adds no specials).
    """
    from tokenizers import Tokenizer

    from models.tokenizers.text import EOS_TOKEN, PAD_TOKEN, BPETokenizer, ByteTokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # OSError, JSON errors, and the plain Exception `tokenizers` raises
        raise ValueError(f"cannot load tokenizer {path}: {e}") from e
    eos, pad = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    if eos is None or pad is None:
        raise NotRepresentable(
            f"{path} lacks the {EOS_TOKEN!r} / {PAD_TOKEN!r} special tokens our text tokenizers use (a tokenizer from "
            "elsewhere); import the weights alone with --no-tokenizer and attach a tokenizer of ours")
    probe = Tokenizer.from_str(json.dumps(data))
    probe.post_processor = _bos_template(probe, eos)
    if data.get("post_processor") == json.loads(probe.to_str())["post_processor"]:
        data["post_processor"] = None
    byte = json.loads(byte_level_tokenizer().to_str())
    if {k: data.get(k) for k in ("model", "added_tokens", "pre_tokenizer", "decoder")} == \
            {k: byte.get(k) for k in ("model", "added_tokens", "pre_tokenizer", "decoder")}:
        return ByteTokenizer()
    return BPETokenizer(Tokenizer.from_str(json.dumps(data)))
