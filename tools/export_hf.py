"""Export a language-model checkpoint to a Hugging Face transformers folder.

    python tools/export_hf.py CKPT OUT_DIR [--dtype bfloat16] [--force]

A dense LM becomes a `LlamaForCausalLM` folder; an MoE LM a `MixtralForCausalLM` one (softmax gates,
top-k renormalised, no shared experts) or a `Qwen2MoeForCausalLM` one (shared experts, or top-k not
renormalised); tools/hf_format.py says why each matches exactly. OUT_DIR gets config.json,
model.safetensors and, when the checkpoint carries its tokenizer, generation_config.json,
tokenizer.json + tokenizer_config.json + special_tokens_map.json, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR); AutoTokenizer.from_pretrained(OUT_DIR)

compute our logits. The tokenizer prepends <eos> as BOS by default (the prompt format generate.py uses);
`add_special_tokens=False` gives exactly our ids. Dropout and the balance losses are training-only and
not carried (the router's aux-loss weight is recorded as router_aux_loss_coef).

A model HF cannot express (MoUE, sigmoid gates, a non-zero aux-loss-free selection bias, capacity
dropping) or a checkpoint of another family (ERNIE 3.0, VideoAR) is refused with an error saying what;
nothing is written. The folder is written beside OUT_DIR under a temporary name and renamed into place;
an existing OUT_DIR is replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.io import atomic_write_text, fsync_dir, load_checkpoint  # noqa: E402
from models.transformer import Transformer, TransformerConfig, upgrade_state_dict  # noqa: E402
from tools.hf_format import (NotRepresentable, check_representable, check_shapes, hf_config,  # noqa: E402
                             hf_state, hf_tokenizer_files, write_safetensors)

__all__ = ["export_hf", "load_lm_checkpoint"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lm_checkpoint(path: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor], dict]:
    """(config, network state under current names, whole checkpoint) of a single-file LM checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a distributed (FSDP2) checkpoint; consolidate it first: "
                                f"python tools/consolidate_checkpoint.py {path} {path.with_suffix('.consolidated.ckpt')}")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (a {type(ckpt).__name__})")
    hp = ckpt.get("hyper_parameters") or {}
    if "ernie3_knobs" in ckpt:
        raise NotRepresentable(f"{path} is an ERNIE 3.0 checkpoint (shared + task networks with their own heads): "
                               "no Hugging Face causal-LM architecture represents it; export language models only")
    if "video_tokenizer" in ckpt or "tokenizer_ckpt" in hp:
        raise NotRepresentable(f"{path} is a VideoAR checkpoint (multi-scale video tokens, 3-axis rotary positions): "
                               "no Hugging Face causal-LM architecture represents it; export language models only")
    if "net" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a language-model checkpoint written by train.py (no hyper_parameters.net "
                         "or state_dict)")
    try:
        cfg = TransformerConfig.from_dict(json.loads(json.dumps(dict(hp["net"]))))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: hyper_parameters.net is not a language-model config: {e}") from e
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    state = upgrade_state_dict(state)[0]  # a checkpoint written before the one-trunk refactor
    return cfg, state, ckpt


def export_hf(ckpt_path: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False) -> dict:
    """Write the HF folder; returns {'path', 'model_type', 'architecture', 'tensors', 'tokenizer'}."""
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg, state, ckpt = load_lm_checkpoint(ckpt_path)
    model_type = check_representable(cfg)
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    try:
        check_shapes(state, expected, str(ckpt_path))
    except ValueError as e:
        raise ValueError(f"{e} (the weights do not fit hyper_parameters.net)") from e
    tokenizer = None
    if "tokenizer" in ckpt:
        from lit_modules.lm import tokenizer_from_state

        tokenizer = tokenizer_from_state(ckpt["tokenizer"])
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{ckpt_path}: the tokenizer has {tokenizer.vocab_size} ids, the model only {cfg.vocab_size}")
    tensors = hf_state(state, cfg, model_type)
    out_dtype = DTYPES[dtype] if dtype else tensors["model.embed_tokens.weight"].dtype
    tensors = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = hf_config(cfg, model_type, tokenizer, out_dtype)
    config["sparse_ar_lab"] = {"source": str(ckpt_path), "net": json.loads(json.dumps(dict(ckpt["hyper_parameters"]["net"])))}
    files = {"config.json": json.dumps(config, indent=2)}
    if tokenizer is not None:
        gen = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        files["generation_config.json"] = json.dumps(gen, indent=2)
        files.update(hf_tokenizer_files(tokenizer, cfg.max_seq_len))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        write_safetensors(tmp / "model.safetensors", tensors, {"source": "sparse_ar_lab tools/export_hf.py"})
        for name, text in files.items():
            atomic_write_text(tmp / name, text + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # temporary files are created private; give the folder the usual modes
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": out_dir, "model_type": model_type, "architecture": config["architectures"][0],
            "tensors": len(tensors), "tokenizer": tokenizer is not None}


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to out_dir; an existing out_dir is moved aside first and removed after."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="single-file language-model checkpoint written by train.py (or tools/import_hf.py)")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="tensor dtype (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    args = p.parse_args(argv)
    try:
        res = export_hf(args.ckpt, args.out_dir, args.dtype, args.force)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {res['path']}: {res['architecture']} ({res['tensors']} tensors"
          f"{', tokenizer' if res['tokenizer'] else ', no tokenizer'})")
    return res


if __name__ == "__main__":
    main()
