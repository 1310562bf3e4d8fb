"""Loading other people's files never unpickles code (issue 15): every loader refuses a checkpoint whose
pickle would run code, naming the file, and the code never runs; the project's own checkpoints still load.

The hostile checkpoints here carry an object whose `__reduce__` is `builtins.open(MARKER, "w")`: harmless,
but unpickling it without `weights_only` creates MARKER (`test_the_payload_really_runs_code_when_unpickled`
shows it does), so an absent MARKER after a refused load shows nothing was unpickled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import train
from lit_modules.checkpointing import AtomicCheckpointIO
from models.io import UnsafeCheckpointError, check_dcp_checkpoint, load_checkpoint
from tests.helpers import ROOT

FIX = ROOT / "tests" / "fixtures"


class Payload:
    """Unpickles as `open(marker, "w")`: a file appears if (and only if) the pickle is executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_lm_checkpoint(path: Path, marker: Path) -> Path:
    """A real LM checkpoint (so every loader gets as far as it can) with the payload in its hyper-parameters."""
    ckpt = torch.load(FIX / "lm.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["net"] = {**ckpt["hyper_parameters"]["net"], "extra": Payload(marker)}
    ckpt["ernie3_knobs"] = {"payload": Payload(marker)}
    torch.save(ckpt, path)
    return path


@pytest.fixture
def hostile(tmp_path):
    """(hostile checkpoint, marker); asserts after the test that the marker was never created."""
    marker = tmp_path / "MARKER"
    path = hostile_lm_checkpoint(tmp_path / "shared.ckpt", marker)
    yield path, marker
    assert not marker.exists(), "the hostile checkpoint's pickle ran"


def refused(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert isinstance(err.value, UnsafeCheckpointError), f"{type(err.value).__name__}: {msg}"
    assert str(path) in msg and "refusing to load" in msg and "arbitrary code" in msg, msg


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "MARKER"
    path = hostile_lm_checkpoint(tmp_path / "shared.ckpt", marker)
    torch.load(path, weights_only=False)  # the unsafe load every loader used to do
    assert marker.exists()


def test_helper_refuses_names_the_file_and_reports_the_global(hostile):
    path, _ = hostile
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    refused(err, path)
    assert "GLOBAL io.open" in str(err.value)  # what the unpickler refused
    assert "add_safe_globals" not in str(err.value)  # no advice to allow-list a stranger's callable


def test_helper_errors_for_missing_directory_and_garbage_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        load_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt"):
        load_checkpoint(garbage, what="tokenizer checkpoint")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "ok.pt").read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)


def test_generate_refuses(hostile):
    import generate

    path, _ = hostile
    for load in (generate.load_module, generate.load_videoar, generate.is_videoar):
        with pytest.raises(UnsafeCheckpointError) as err:
            load(path)
        refused(err, path)


def test_generate_cli_refuses(hostile):
    import generate

    path, _ = hostile
    with pytest.raises(UnsafeCheckpointError) as err:
        generate.main([str(path), "--device", "cpu"])
    refused(err, path)


@pytest.mark.parametrize("plugins", ["default", "lightning_io"])
def test_train_ckpt_path_refuses(plugins, hostile, make_cfg):
    """Resuming goes through AtomicCheckpointIO, or (plugins=null) Lightning's reader with weights_only=True."""
    path, _ = hostile
    extra = ["trainer.plugins=null"] if plugins == "lightning_io" else []
    cfg = make_cfg(["trainer.max_steps=1", "test=false", f"ckpt_path={path}", *extra])
    with pytest.raises(UnsafeCheckpointError) as err:
        train.run(cfg)
    refused(err, path)


def test_model_init_ckpt_refuses(hostile, make_cfg):
    path, _ = hostile
    with pytest.raises(UnsafeCheckpointError) as err:
        train.run(make_cfg(["trainer.max_steps=1", "test=false", f"model.init_ckpt={path}"]))
    refused(err, path)
    assert "model.init_ckpt" in str(err.value)


def test_ernie3_finetune_init_ckpt_refuses(hostile):
    from lit_modules.ernie3 import Ernie3FinetuneModule

    path, _ = hostile
    with pytest.raises(UnsafeCheckpointError) as err:
        Ernie3FinetuneModule(init_ckpt=str(path), num_classes=2)
    refused(err, path)


def test_tools_and_tokenizer_loading_refuse(hostile, tmp_path, capsys):
    from models.tokenizers.checkpoint import load_media_tokenizer
    from tools import convert_moe_to_moue, ernie3_probe, export_submodel

    path, _ = hostile
    calls = {
        "export_submodel": lambda: export_submodel.export_submodel(path, tmp_path / "sub.ckpt", depth=1),
        "convert_moe_to_moue": lambda: convert_moe_to_moue.main([str(path), str(tmp_path / "moue")]),
        "ernie3_probe": lambda: ernie3_probe.main([str(path)]),
        "tokenizer": lambda: load_media_tokenizer(path),
    }
    for name, call in calls.items():
        with pytest.raises(UnsafeCheckpointError) as err:
            call()
        refused(err, path)
    with pytest.raises(SystemExit):  # the command line reports the refusal as an argument error
        export_submodel.main([str(path), str(tmp_path / "sub.ckpt"), "--depth", "1"])
    assert str(path) in capsys.readouterr().err
    assert not (tmp_path / "sub.ckpt").exists() and not (tmp_path / "moue").exists()


def write_dcp_checkpoint(directory: Path, meta: dict, extra: dict | None = None) -> Path:
    """A Lightning-FSDP2-shaped directory: DCP shards (+ `extra` entries) and `meta.pt`."""
    state = {"state_dict": {"model.w": torch.arange(6.0).reshape(2, 3)},
             "optimizer_0": {"param_groups": [{"lr": 0.1, "params": ["model.w"]}]}, **(extra or {})}
    with pytest.warns(UserWarning):  # "torch.distributed is disabled ...": one process is the intent
        dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save(meta, directory / "meta.pt")
    return directory


def test_consolidate_reads_a_clean_distributed_checkpoint(tmp_path):
    from tools.consolidate_checkpoint import consolidate

    src = write_dcp_checkpoint(tmp_path / "last.ckpt", {"hyper_parameters": {"net": {"d_model": 3}}, "epoch": 1})
    check_dcp_checkpoint(src)
    out = consolidate(src, tmp_path / "out.ckpt")
    assert torch.equal(out["state_dict"]["model.w"], torch.arange(6.0).reshape(2, 3)) and out["epoch"] == 1
    assert load_checkpoint(tmp_path / "out.ckpt")["hyper_parameters"] == {"net": {"d_model": 3}}


@pytest.mark.parametrize("where", ["meta.pt", "entry", ".metadata"])
def test_consolidate_and_fsdp_resume_refuse_a_hostile_distributed_checkpoint(where, tmp_path):
    from lit_modules.checkpointing import AtomicModelParallelStrategy
    from tools.consolidate_checkpoint import consolidate

    marker = tmp_path / "MARKER"
    meta = {"epoch": 1, **({"payload": Payload(marker)} if where == "meta.pt" else {})}
    src = write_dcp_checkpoint(tmp_path / "last.ckpt", meta, {"payload": Payload(marker)} if where == "entry" else None)
    if where == ".metadata":  # torch.distributed.checkpoint reads this file with plain pickle.load
        import pickle

        (src / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    bad = src / where if where != "entry" else src
    with pytest.raises(UnsafeCheckpointError) as err:
        consolidate(src, tmp_path / "out.ckpt")
    refused(err, bad)
    if where != "meta.pt":  # the strategy checks the directory before Lightning opens it
        strategy = AtomicModelParallelStrategy()
        strategy.broadcast = lambda obj, src=0: obj  # no process group in this test
        with pytest.raises(UnsafeCheckpointError) as err:
            strategy.load_checkpoint(src)
        refused(err, bad)
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_checkpoint_io_never_unpickles_fully(tmp_path):
    with pytest.raises(ValueError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(FIX / "lm.ckpt", weights_only=False)
    assert "state_dict" in AtomicCheckpointIO().load_checkpoint(FIX / "lm.ckpt", weights_only=True)


@pytest.mark.parametrize("name", ["lm.ckpt", "moe.ckpt", "moue.ckpt", "videoar.ckpt", "videoar_tokenizer.pt",
                                  "expected.pt"])
def test_project_fixtures_load_through_the_helper(name):
    ckpt = load_checkpoint(FIX / name)
    assert isinstance(ckpt, dict) and ckpt


def test_a_fresh_checkpoint_loads_weights_only_resumes_and_generates(make_cfg, tmp_path):
    import generate

    train.run(make_cfg(["trainer.max_steps=2", "test=false", "logger=csv"], subdir="a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"] and ckpt["hyper_parameters"]["net"]
    train.run(make_cfg(["trainer.max_steps=3", "test=true", "logger=csv", f"ckpt_path={last}"], subdir="b"))
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == 3
    module = generate.load_module(last)
    assert module.generate_text([""], max_new_tokens=2)
