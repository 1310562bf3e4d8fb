"""Convert a trained MoE language-model checkpoint into a MoUE one (progressive conversion).

    python tools/convert_moe_to_moue.py MOE.ckpt OUT_DIR --window 2

Procedure (papers.md 1.2.E):
  * the pool is the union of the MoE's experts: pool block l <- layer l's experts (B = L, b = E);
  * the universal router's row for pool expert e <- e's home-layer router row; its trajectory-state
    columns, the expert signatures and the depth embeddings start at 0;
  * a learnable layer x block routing bias starts at 0 on home blocks and -beta elsewhere;
  * shared experts, attention, norms and embeddings are copied unchanged.
With the window at 1 every layer sees exactly its own experts, so the converted model computes the
source model's logits; `callbacks.moue_window` then opens the window over continued training.

Writes OUT_DIR/moue.ckpt (weights + hyper-parameters + tokenizer, for `model.init_ckpt`) and
OUT_DIR/experiment/moue_converted.yaml; continue with
    python train.py --config-dir OUT_DIR experiment=moue_converted
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.io import atomic_torch_save, atomic_write_text, load_checkpoint  # noqa: E402
from models.transformer import Transformer, TransformerConfig, upgrade_state_dict  # noqa: E402


def moue_config_from_moe(net: dict, window: int, trajectory: str, state_dim: int, beta: float) -> dict:
    """The MoUE net config matching an MoE one (iso-total, iso-activated: N_U = L * E)."""
    if net.get("ffn") != "moe":
        raise ValueError(f"source checkpoint is not an MoE model (model.net.ffn={net.get('ffn')!r})")
    out = copy.deepcopy(net)
    out["ffn"] = "moue"
    moue = dict(out.get("moue") or {})
    moue.update(
        num_blocks=None, block_size=None, window=window, stride=1, centered=False, router="universal",
        trajectory=trajectory, state_dim=state_dim, block_bias=True, block_bias_init=beta,
    )
    out["moue"] = moue
    return out


def convert_state(src: dict[str, torch.Tensor], src_cfg: TransformerConfig, dst: Transformer) -> tuple[dict, list[tuple[str, str]]]:
    """Map MoE tensors onto the MoUE model's state; returns (state, [(source key, target key)])."""
    L, E = src_cfg.n_layers, src_cfg.moe.num_experts
    target = {k: v.clone() for k, v in dst.state_dict().items()}
    mapping: list[tuple[str, str]] = []
    used: set[str] = set()

    def put(src_key: str, dst_key: str, value: torch.Tensor, rows: slice | None = None, cols: slice | None = None):
        t = target[dst_key]
        view = t if rows is None else t[rows]
        view = view if cols is None else view[..., cols]
        if view.shape != value.shape:
            raise ValueError(f"{src_key} {tuple(value.shape)} does not fit {dst_key}{tuple(view.shape)}")
        view.copy_(value)
        mapping.append((src_key, dst_key + ("" if rows is None else f"[{rows.start}:{rows.stop}]")))
        used.add(src_key)

    d = src_cfg.d_model
    routers = "trunk.pool.routing.routers."
    for key in target:
        if key.startswith(routers) and key.endswith("weight"):
            target[key][:, d:] = 0.0  # trajectory-state columns: the state starts with no influence
    for key, value in src.items():
        parts = key.split(".")
        if key.startswith("trunk.layers.") and parts[3] == "ffn":
            layer, rest = int(parts[2]), ".".join(parts[4:])
            home = slice(layer * E, (layer + 1) * E)
            if rest in ("experts.w13", "experts.w2"):
                put(key, f"trunk.pool.{rest}", value, rows=home)
            elif rest.startswith("router.") and rest.endswith("weight"):
                put(key, routers + "0." + rest.removeprefix("router."), value, rows=home, cols=slice(0, d))
            elif rest == "router.expert_bias":
                put(key, routers + "0.expert_bias", value, rows=home)
            elif rest.startswith("shared."):
                put(key, f"trunk.layers.{layer}.ffn.{rest}", value)
            else:
                raise ValueError(f"no MoUE counterpart for MoE tensor {key}")
        elif key in target:
            put(key, key, value)
        else:
            raise ValueError(f"no MoUE counterpart for tensor {key}")
    missing = set(src) - used
    if missing:
        raise AssertionError(f"source tensors not carried over: {sorted(missing)}")
    return target, mapping


def convert(src_path: str | Path, out_dir: str | Path, window: int = 2, trajectory: str = "additive",
            state_dim: int = 64, beta: float = 4.0, schedule: list[list[float]] | None = None) -> dict:
    src_path, out_dir = Path(src_path), Path(out_dir)
    ckpt = load_checkpoint(src_path)  # weights only: a file that would unpickle code is refused
    hp = ckpt["hyper_parameters"]
    src_cfg = TransformerConfig.from_dict(dict(hp["net"]))
    net = moue_config_from_moe(dict(hp["net"]), window, trajectory, state_dim, beta)
    dst_cfg = TransformerConfig.from_dict(copy.deepcopy(net))
    dst = Transformer(dst_cfg)
    src = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    src = upgrade_state_dict(src)[0]  # a checkpoint written before the one-trunk refactor
    state, mapping = convert_state(src, src_cfg, dst)
    dst.load_state_dict(state)

    out_dir.mkdir(parents=True, exist_ok=True)
    new_hp = {**hp, "net": net, "init_ckpt": None}
    out = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": new_hp,
        "moue_window": 1,
        "converted_from": str(src_path),
        "conversion_mapping": mapping,
    }
    if "tokenizer" in ckpt:
        out["tokenizer"] = ckpt["tokenizer"]
    atomic_torch_save(out, out_dir / "moue.ckpt")
    schedule = schedule or [[0, 1], [0.25, min(2, window)], [0.5, window]]
    data = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if k not in ("cache_dir", "seed")}
    _write_experiment(out_dir, net, out_dir / "moue.ckpt", schedule, data)
    return {"mapping": mapping, "net": net, "path": out_dir / "moue.ckpt"}


def _write_experiment(out_dir: Path, net: dict, ckpt: Path, schedule: list[list[float]], data: dict) -> None:
    from omegaconf import OmegaConf

    exp = {
        "data": data,  # the source run's data settings: same corpus, tokenizer and batch shape
        "tags": ["lm", "moue", "converted"],
        "model": {"net": net, "init_ckpt": str(ckpt.resolve())},
        "callbacks": {"moue_window": {"_target_": "callbacks.moue_schedule.MoUEWindowSchedule", "milestones": schedule}},
    }
    path = out_dir / "experiment" / "moue_converted.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# @package _global_\n# Written by tools/convert_moe_to_moue.py: continue training the converted MoUE.\n"
    atomic_write_text(path, text + OmegaConf.to_yaml(OmegaConf.create(exp)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="single-file MoE checkpoint written by train.py (consolidate FSDP2 ones first)")
    p.add_argument("out_dir")
    p.add_argument("--window", type=int, default=2, help="final window W of the staggered rotational topology")
    p.add_argument("--trajectory", default="additive", choices=["off", "additive", "gru"])
    p.add_argument("--state-dim", type=int, default=64)
    p.add_argument("--beta", type=float, default=4.0, help="initial routing penalty of non-home blocks")
    args = p.parse_args(argv)
    result = convert(args.src, args.out_dir, args.window, args.trajectory, args.state_dim, args.beta)
    for s, d in result["mapping"]:
        print(f"{s:45s} -> {d}")
    print(f"wrote {result['path']} and {Path(args.out_dir) / 'experiment' / 'moue_converted.yaml'}")


if __name__ == "__main__":
    main()
