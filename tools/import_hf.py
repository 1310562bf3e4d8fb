"""Import a local Hugging Face transformers folder (Llama, Mixtral or Qwen2-MoE) as a language-model checkpoint.

    python tools/import_hf.py HF_DIR OUT.ckpt [--dtype keep] [--no-tokenizer]

HF_DIR holds config.json and model.safetensors (or sharded model-*.safetensors with their index). OUT.ckpt
holds the weights under our names, hyper_parameters.net (the `model.net` that builds them) and, when
HF_DIR has a tokenizer.json with our <eos> / <pad> specials (any folder tools/export_hf.py wrote), the
tokenizer; then

    python generate.py OUT.ckpt --prompt "..."                        # sample from it
    python train.py experiment=lm_tiny model.net=... model.init_ckpt=OUT.ckpt   # train on from it

(the printed model.net overrides, or `net` of the checkpoint's hyper_parameters). A folder that
tools/export_hf.py wrote also restores the training-only knobs it recorded (dropout, balancing options,
the split of the shared-expert width), so export -> import gives back the same checkpoint tensors and net.

Anything our LM cannot compute exactly is refused with an error naming the key or tensor: other
architectures, rope scaling, attention / MLP biases (unless all zero), sliding-window attention, dense
layers between MoE layers, a Qwen2-MoE shared-expert gate that is not zero (our shared experts are
ungated), a head size other than hidden_size / num_attention_heads. Weights are cast to float32 (the
training dtype) unless --dtype keep.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.io import atomic_torch_save  # noqa: E402
from models.transformer import Transformer, TransformerConfig  # noqa: E402
from tools.hf_format import (check_shapes, net_from_hf_config, our_state, read_hf_weights,  # noqa: E402
                             shared_experts_are_zero, tokenizer_from_hf)

__all__ = ["import_hf"]

# model.net fields config.json does not determine (training-only); restored from an export's record
_TRAINING_KNOBS = ("dropout", "attn_impl")
_MOE_TRAINING_KNOBS = ("z_loss_coef", "noise_std", "bias_balancing", "bias_update_rate", "impl")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a Hugging Face model folder)")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def _restore_knobs(net: dict, recorded: dict) -> dict:
    """Fill the training-only and unused fields from the net an export recorded (config.json's
    `sparse_ar_lab.net`); what config.json determines stays as config.json says."""
    net = copy.deepcopy(net)
    for key in _TRAINING_KNOBS:
        if key in recorded:
            net[key] = recorded[key]
    inert = ["moue"] + (["moe"] if net.get("ffn") == "dense" else ["ffn_hidden"])  # fields this ffn kind ignores
    for key in inert:
        if key in recorded:
            net[key] = copy.deepcopy(recorded[key])
    if net.get("ffn") == "moe" and isinstance(recorded.get("moe"), dict):
        rec = recorded["moe"]
        for key in _MOE_TRAINING_KNOBS:
            if key in rec:
                net["moe"][key] = rec[key]
        moe = net["moe"]
        width = moe.get("num_shared", 0) * (moe.get("shared_hidden") or 0)
        n, h = rec.get("num_shared") or 0, rec.get("shared_hidden") or rec.get("expert_hidden")
        if n and h and n * h == width:
            moe["num_shared"], moe["shared_hidden"] = n, rec.get("shared_hidden")
    return net


def import_hf(hf_dir: str | Path, out: str | Path, dtype: str = "float32", tokenizer: bool = True) -> dict:
    """Write OUT.ckpt; returns {'path', 'net', 'model_type', 'tokenizer', 'tensors'}."""
    if dtype not in ("float32", "keep"):
        raise ValueError(f"--dtype must be float32 or keep, got {dtype!r}")
    folder, out = Path(hf_dir), Path(out)
    config = read_config(folder)
    where = str(folder / "config.json")
    net = net_from_hf_config(config, where)
    model_type = config["model_type"]
    hf = read_hf_weights(folder)
    if model_type == "qwen2_moe" and shared_experts_are_zero(hf, net["n_layers"]):
        net["moe"].update(num_shared=0, shared_hidden=None)  # an export of a model without shared experts
    recorded = config.get("sparse_ar_lab")
    if isinstance(recorded, dict) and isinstance(recorded.get("net"), dict):
        net = _restore_knobs(net, recorded["net"])
    try:
        cfg = TransformerConfig.from_dict(copy.deepcopy(net))
    except ValueError as e:
        raise ValueError(f"{where}: gives an invalid model.net: {e}") from e
    net = cfg.to_dict()
    state = our_state(hf, net, model_type, str(folder / "model.safetensors"))
    if dtype == "float32":
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]  # one tensor, as in a trained model's state dict
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    check_shapes(state, expected, str(folder))
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": {"net": net, "init_ckpt": None},
        "pytorch-lightning_version": metadata.version("lightning"),
        "hf_import": {"source": str(folder), "model_type": model_type},
    }
    tok = tokenizer_from_hf(folder) if tokenizer else None
    if tok is not None:
        from lit_modules.lm import tokenizer_to_state

        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{folder / 'tokenizer.json'} has {tok.vocab_size} ids, the model's vocab_size is {cfg.vocab_size}")
        ckpt["tokenizer"] = tokenizer_to_state(tok)
    atomic_torch_save(ckpt, out)
    return {"path": out, "net": net, "model_type": model_type, "tokenizer": tok is not None, "tensors": len(state)}


def net_overrides(net: dict, prefix: str = "model.net") -> list[str]:
    """Hydra overrides that set `net` (nested dicts flattened)."""
    out = []
    for key, value in net.items():
        if isinstance(value, dict):
            out += net_overrides(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={'null' if value is None else json.dumps(value)}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("out", help="the checkpoint to write")
    p.add_argument("--dtype", choices=["float32", "keep"], default="float32", help="cast weights to float32 (default) "
                   "or keep the folder's dtype")
    p.add_argument("--no-tokenizer", action="store_true", help="ignore HF_DIR's tokenizer (weights and config only)")
    args = p.parse_args(argv)
    try:
        res = import_hf(args.hf_dir, args.out, args.dtype, not args.no_tokenizer)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {res['path']} from a {res['model_type']} folder ({res['tensors']} tensors, "
          f"{'with' if res['tokenizer'] else 'without'} tokenizer)")
    net = {k: v for k, v in res["net"].items() if k not in ("moue", "moe" if res["net"]["ffn"] == "dense" else "ffn_hidden")}
    print("model.net (for model.init_ckpt): " + " ".join(net_overrides(net)))
    if not res["tokenizer"]:
        print("no tokenizer in the checkpoint: generate.py needs one (model.init_ckpt does not)")
    return res


if __name__ == "__main__":
    main()
