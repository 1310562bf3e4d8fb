"""Cut an elastic sub-model out of a trained checkpoint into a standalone checkpoint.

    python tools/export_submodel.py PARENT.ckpt OUT.ckpt --depth 3 --experts 4 --top-k 1
    python tools/export_submodel.py PARENT.ckpt OUT.ckpt --layers 0 1 3 --experts 4 --rule prefix

Two families: the language models (dense / MoE / MoUE, lit_modules/lm.py) and ERNIE 5.0
(lit_modules/ernie5.py; its embeddings, patch merger, heads and MTP module are kept whole, and the
audio code levels read the sub-model's last Q layers, so at least Q layers must stay).

The sub-model is the one the parent runs with the same elastic choice (callbacks/elastic.py):
  * depth D keeps the first and last layer and drops a contiguous centred middle span
    (`models.layers.elastic.depth_layers`), or exactly `--layers`;
  * E experts per layer are that layer's most used ones by the routing statistics accumulated in
    training (`--rule usage`, the checkpoint's `expert_usage`; the rule elastic training uses by
    default) or the lowest ids (`--rule prefix`); expert weights, router rows and the aux-loss-free
    biases are sliced to match, shared experts are kept whole;
  * K experts per token.
Its outputs equal the parent's under that choice. OUT.ckpt holds the weights, the hyper-parameters
(the `model.net` that builds it) and the tokenizer(s): `generate.py OUT.ckpt` (KV-cached decoding, for
ERNIE 5.0 every `--task`) and `model.init_ckpt=OUT.ckpt` use it without the parent. Beside it, OUT_DIR/experiment/<name>.yaml
continues training it: `python train.py --config-dir OUT_DIR experiment=<name>`.

A choice the checkpoint cannot serve (more layers or experts than it has, K above the experts kept,
MoUE layers whose windows move) is an error naming the argument and its allowed range; nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.io import atomic_torch_save, atomic_write_text  # noqa: E402
from models.io import load_checkpoint as load_weights_only  # noqa: E402
from models.layers.elastic import EXPERT_RULES, RoutingLimit, depth_layers, keep_experts  # noqa: E402
from models.moe.moue import window_blocks  # noqa: E402
from models.transformer import Transformer, TransformerConfig, upgrade_state_dict  # noqa: E402

__all__ = ["export_submodel", "family_of", "plan_submodel"]


@dataclass(frozen=True)
class Family:
    """How one family's checkpoint is laid out: the network's state-dict prefix, its config and
    network classes, the old-key map, and the fewest layers a sub-model may keep."""

    name: str
    prefix: str
    config_cls: Any
    network_cls: Any
    upgrade: Callable = staticmethod(lambda state: state)
    min_depth: Callable = staticmethod(lambda cfg: 1)
    min_depth_why: str = ""
    tags: tuple = ("lm", "elastic_export")
    groups: tuple = ()  # config groups the continuation experiment overrides


def _ernie5_family() -> Family:
    from models.ernie5 import Ernie5, Ernie5Config

    return Family("ernie5", "net.", Ernie5Config, Ernie5, min_depth=lambda cfg: max(1, cfg.audio_levels),
                  min_depth_why="the audio code levels read the last {} layers run", tags=("ernie5", "elastic_export"),
                  groups=(("data", "multimodal"), ("model", "ernie5")))


LM = Family("lm", "model.", TransformerConfig, Transformer, upgrade=lambda state: upgrade_state_dict(state)[0])


def family_of(ckpt: dict, path: str | Path = "checkpoint") -> Family:
    """The family that wrote `ckpt`; an error for families without sub-model export."""
    if "tokenizers" in ckpt and "text_tokenizer" in ckpt:
        return _ernie5_family()
    keys = ckpt.get("state_dict", {})
    if any(k.startswith("model.") for k in keys) and "tokenizers" not in ckpt:
        return LM
    raise ValueError(f"{path}: sub-model export is implemented for language-model (lit_modules/lm.py) and "
                     "ERNIE 5.0 (lit_modules/ernie5.py) checkpoints; this is neither")


def load_checkpoint(path: str | Path) -> dict:
    """A single-file LM or ERNIE 5.0 checkpoint, loaded weights only (a file that would unpickle code is refused)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a distributed (FSDP2) checkpoint; consolidate it first: "
                                f"python tools/consolidate_checkpoint.py {path} {path.with_suffix('.consolidated.ckpt')}")
    ckpt = load_weights_only(path)
    if "hyper_parameters" not in ckpt or "net" not in ckpt["hyper_parameters"]:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no hyper_parameters.net)")
    return ckpt


def plan_submodel(cfg: TransformerConfig, depth: Optional[int] = None, layers: Optional[Sequence[int]] = None,
                  experts: Optional[int] = None, top_k: Optional[int] = None, rule: str = "usage",
                  usage: Optional[torch.Tensor] = None, min_depth: int = 1,
                  min_depth_why: str = "") -> tuple[list[int], Optional[list[list[int]]], Optional[int]]:
    """(kept layers, kept experts per parent layer or None, top_k or None), checked against `cfg`.
    `min_depth`: the fewest layers the family allows (`min_depth_why` says why, for the error).

    Errors name the command-line argument and the range the checkpoint allows.
    """
    L, ffn = cfg.n_layers, cfg.ffn
    why = f"; {min_depth_why}" if min_depth > 1 and min_depth_why else ""
    if layers is not None:
        run = sorted(int(i) for i in layers)
        if not run or len(set(run)) != len(run) or not 0 <= run[0] <= run[-1] < L:
            raise ValueError(f"--layers must be distinct layer ids in [0, {L - 1}], got {list(layers)}")
        if depth is not None and depth != len(run):
            raise ValueError(f"--depth {depth} disagrees with --layers ({len(run)} layers)")
        if len(run) < min_depth:
            raise ValueError(f"--layers must keep at least {min_depth} layers{why}, got {len(run)}")
    else:
        d = L if depth is None else int(depth)
        if not min_depth <= d <= L:
            raise ValueError(f"--depth must be in [{min_depth}, {L}] (the checkpoint has {L} layers{why}), got {d}")
        run = depth_layers(L, d)
    if ffn == "dense":
        if experts is not None or top_k is not None:
            raise ValueError("--experts / --top-k need a sparse checkpoint; this one has model.net.ffn=dense "
                             "(only --depth / --layers apply)")
        return run, None, None
    k = cfg.moe.top_k
    if ffn == "moue":
        r = cfg.moue
        B = cfg.pool_blocks
        width = r.window * (r.block_size or cfg.moe.num_experts)
        if experts is not None and experts != cfg.pool_size:
            raise ValueError(f"--experts: width export is implemented for ffn=moe only; for this MoUE checkpoint "
                             f"the allowed value is its pool size {cfg.pool_size} (or leave it out)")
        moved = [(i, j) for i, j in enumerate(run) if set(window_blocks(i, B, r.window, r.stride, r.centered))
                 != set(window_blocks(j, B, r.window, r.stride, r.centered))]
        if moved:
            i, j = moved[0]
            raise ValueError(f"--depth/--layers: layers {run} break the MoUE window: parent layer {j} would become "
                             f"layer {i}, whose window is other blocks; allowed: a prefix of the layers "
                             f"(--layers 0 .. D-1) or any layers when moue.window == num_blocks ({B})")
        kk = k if top_k is None else int(top_k)
        if not 1 <= kk <= width:
            raise ValueError(f"--top-k must be in [1, {width}] (experts in a layer's window), got {kk}")
        return run, None, (None if top_k is None else kk)
    E = cfg.moe.num_experts
    n = E if experts is None else int(experts)
    if not 1 <= n <= E:
        raise ValueError(f"--experts must be in [1, {E}] (the checkpoint has {E} experts per layer), got {n}")
    kk = min(k, n) if top_k is None else int(top_k)
    if not 1 <= kk <= n:
        raise ValueError(f"--top-k must be in [1, {n}] (the experts kept per layer), got {kk}")
    if top_k is None and kk != k:
        raise ValueError(f"--experts {n} is below the checkpoint's top_k={k}: give --top-k in [1, {n}]")
    kept = None if n == E else keep_experts(n, E, L, rule, usage)
    return run, kept, (None if kk == k else kk)


def slice_state(state: dict[str, torch.Tensor], cfg: TransformerConfig, run: list[int],
                kept: Optional[list[list[int]]]) -> dict[str, torch.Tensor]:
    """The parent's tensors renumbered to the kept layers, experts sliced per layer (MoE)."""
    out: dict[str, torch.Tensor] = {}
    per_layer_pool = ("trunk.pool.routing.depth", "trunk.pool.routing.block_bias")
    for key, value in state.items():
        if key.startswith("trunk.layers."):
            _, _, j, rest = key.split(".", 3)
            if int(j) not in run:
                continue
            i = run.index(int(j))
            if kept is not None and rest in ("ffn.router.weight", "ffn.router.expert_bias", "ffn.experts.w13",
                                             "ffn.experts.w2"):
                value = value[kept[int(j)]]
            out[f"trunk.layers.{i}.{rest}"] = value.clone()
        elif key in per_layer_pool:
            out[key] = value[run].clone()
        elif key.startswith("trunk.pool.routing.routers.") and cfg.moue.router == "per_layer":
            _, _, _, _, j, rest = key.split(".", 5)
            if int(j) in run:
                out[f"trunk.pool.routing.routers.{run.index(int(j))}.{rest}"] = value.clone()
        else:
            out[key] = value.clone()
    return out


def sub_net_config(net: dict, cfg: TransformerConfig, run: list[int], kept, top_k: Optional[int]) -> dict:
    out = copy.deepcopy(dict(net))
    out["n_layers"] = len(run)
    moe = dict(out.get("moe") or {})
    if kept is not None:
        moe["num_experts"] = len(kept[0])
    if top_k is not None:
        moe["top_k"] = int(top_k)
    out["moe"] = moe
    if cfg.ffn == "moue":
        moue = dict(out.get("moue") or {})
        moue["num_blocks"] = cfg.pool_blocks  # the pool keeps all its blocks; fewer layers share it
        out["moue"] = moue
    return out


def export_submodel(src: str | Path, out: str | Path, depth: Optional[int] = None, layers: Optional[Sequence[int]] = None,
                    experts: Optional[int] = None, top_k: Optional[int] = None, rule: str = "usage") -> dict:
    """Write the sub-model; returns {'path', 'experiment', 'family', 'layers', 'kept', 'top_k', 'params', 'net'}."""
    if rule not in EXPERT_RULES:
        raise ValueError(f"--rule must be one of {list(EXPERT_RULES)}, got {rule!r}")
    ckpt = load_checkpoint(src)
    fam = family_of(ckpt, src)
    hp = ckpt["hyper_parameters"]
    cfg = fam.config_cls.from_dict(copy.deepcopy(dict(hp["net"])))
    usage = ckpt.get("expert_usage")
    if rule == "usage" and experts is not None and cfg.ffn == "moe" and usage is None:
        raise ValueError(f"--rule usage needs routing statistics, and {src} has none (written before elastic "
                         "training existed?); use --rule prefix")
    floor = fam.min_depth(cfg)
    run, kept, k = plan_submodel(cfg, depth, layers, experts, top_k, rule, usage, min_depth=floor,
                                 min_depth_why=fam.min_depth_why.format(floor))
    n = len(fam.prefix)
    state = {kk[n:]: v for kk, v in ckpt["state_dict"].items() if kk.startswith(fam.prefix)}
    state = fam.upgrade(state)
    net = sub_net_config(hp["net"], cfg, run, kept, k)
    sub = fam.network_cls(fam.config_cls.from_dict(copy.deepcopy(net)))
    new_state = slice_state(state, cfg, run, kept)
    sub.load_state_dict(new_state, strict=True)  # every tensor of the sub-model comes from the parent
    params = sub.num_params()

    out = Path(out)
    meta = {"parent": str(src), "layers": run, "kept": kept, "top_k": k or cfg.moe.top_k, "rule": rule}
    # the module's own buffers (ERNIE 5.0's loss EMAs) travel unchanged
    others = {kk: v for kk, v in ckpt["state_dict"].items() if not kk.startswith(fam.prefix)}
    new = {
        "state_dict": {**others, **{f"{fam.prefix}{kk}": v for kk, v in sub.state_dict().items()}},
        "hyper_parameters": {**hp, "net": net, "init_ckpt": None},
        "elastic_export": meta,
    }
    for key in ("tokenizer", "tokenizers", "text_tokenizer", "knobs", "global_step", "pytorch-lightning_version",
                "datamodule_hyper_parameters", "hparams_name"):
        if key in ckpt:
            new[key] = ckpt[key]
    if usage is not None and cfg.ffn == "moe":
        u = usage[run]
        new["expert_usage"] = u if kept is None else torch.stack([usage[j][kept[j]] for j in run])
    atomic_torch_save(new, out)
    exp = _write_experiment(out, net, ckpt.get("datamodule_hyper_parameters") or {}, fam)
    return {"path": out, "experiment": exp, "family": fam.name, "layers": run, "kept": kept, "top_k": meta["top_k"],
            "params": params, "net": net}


def _write_experiment(out: Path, net: dict, data: dict, fam: Family = LM) -> Path:
    from omegaconf import OmegaConf

    exp = {"data": {k: v for k, v in data.items() if k not in ("cache_dir", "seed")}, "tags": list(fam.tags),
           "model": {"net": net, "init_ckpt": str(out.resolve())}}
    if fam.groups:
        exp = {"defaults": [{f"override /{group}": option} for group, option in fam.groups], **exp}
    path = out.parent / "experiment" / f"{out.stem}.yaml"
    text = ("# @package _global_\n# Written by tools/export_submodel.py: train the exported sub-model further.\n")
    atomic_write_text(path, text + OmegaConf.to_yaml(OmegaConf.create(exp)))
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="single-file checkpoint written by train.py (consolidate FSDP2 ones first)")
    p.add_argument("out", help="the sub-model checkpoint to write")
    p.add_argument("--depth", type=int, help="layers kept (first and last, a centred middle span dropped)")
    p.add_argument("--layers", type=int, nargs="+", help="exact layer ids to keep (instead of --depth)")
    p.add_argument("--experts", type=int, help="routed experts kept per layer (MoE)")
    p.add_argument("--top-k", type=int, dest="top_k", help="experts per token")
    p.add_argument("--rule", default="usage", choices=list(EXPERT_RULES), help="which experts a layer keeps")
    args = p.parse_args(argv)
    try:
        res = export_submodel(args.src, args.out, args.depth, args.layers, args.experts, args.top_k, args.rule)
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"family: {res['family']}")
    print(f"layers kept: {res['layers']}")
    if res["kept"] is not None:
        for j, ids in zip(res["layers"], (res["kept"][j] for j in res["layers"])):
            print(f"layer {j}: experts {ids}")
    print(f"top_k: {res['top_k']}")
    print(f"parameters: total {res['params']['total']:,}, activated per token {res['params']['activated']:,}")
    print(f"wrote {res['path']} and {res['experiment']}")
    return res


if __name__ == "__main__":
    main()
