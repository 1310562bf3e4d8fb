"""Routing-analysis callback end to end on a tiny fake module, the figures it draws, and its config."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from callbacks.figures import figure_to_array, heatmap_figure, lines_figure, save_png
from callbacks.routing_analysis import RoutingAnalysis

ROOT = Path(__file__).resolve().parents[2]


class FakeRouted(L.LightningModule):
    """Two groups, 3 layers, 8 experts: "text" routes to experts {0, 1}, "image" to {1, 2}."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.track_routing = False
        self.routing_counts: dict[str, torch.Tensor] = {}
        self.seen_recording: list[bool] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_recording.append(self.track_routing)
        if self.track_routing:
            for name, experts in (("text", [0, 1]), ("image", [1, 2])):
                c = torch.zeros(3, 8, dtype=torch.long)
                c[:, experts] = 4
                self.routing_counts[name] = self.routing_counts.get(name, torch.zeros_like(c)) + c
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)

    val_dataloader = train_dataloader


def test_callback_writes_report_and_images(tmp_path):
    module = FakeRouted()
    logger = TensorBoardLogger(tmp_path)
    trainer = L.Trainer(max_steps=2, limit_train_batches=2, limit_val_batches=2, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RoutingAnalysis()], default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module)
    assert module.track_routing is False and module.seen_recording[-2:] == [True, True]
    assert module.seen_recording[:2] == [False, False]  # sanity check is not recorded
    md = (Path(trainer.log_dir) / "routing" / "step_2.md").read_text()
    assert "| image | 1.00 | 0.33 |" in md and "| text | 0.33 | 1.00 |" in md
    counts = torch.load(Path(trainer.log_dir) / "routing" / "step_2.counts.pt", weights_only=True)
    assert sorted(counts) == ["image", "text"] and all(v.dtype == torch.int64 and v.dim() == 2 for v in counts.values())
    assert torch.equal(counts["text"], module.routing_counts["text"].cpu())
    assert trainer.callback_metrics["routing/iou/image__text/layer_1"] == pytest.approx(1 / 3)
    assert "routing/ne/text/layer_3" in trainer.callback_metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {"routing/frequency/layer_1", "routing/frequency/layer_2", "routing/frequency/layer_3",
            "routing/iou/layer_1", "routing/entropy"} <= images


def test_dense_module_is_skipped(tmp_path):
    class Dense(FakeRouted):
        def __init__(self):
            super().__init__()
            del self.track_routing

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    trainer = L.Trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RoutingAnalysis()], default_root_dir=tmp_path, accelerator="cpu",
                        num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="track_routing"):
        trainer.fit(Dense())
    assert not (tmp_path / "routing").exists()


@pytest.mark.parametrize("key,value", [("every_n_val", 0), ("fraction", 0.0), ("fraction", 1.5), ("images", "yes"),
                                       ("markdown", 1)])
def test_bad_config_names_key(key, value):
    with pytest.raises(ValueError, match=f"callbacks.routing_analysis.{key}"):
        RoutingAnalysis(**{key: value})


def test_config_instantiates():
    cb = instantiate(OmegaConf.load(ROOT / "conf" / "callbacks" / "routing_analysis" / "default.yaml"))
    assert isinstance(cb, RoutingAnalysis) and cb.every_n_val == 1 and cb.fraction == 0.25


def test_heatmap_figure(tmp_path):
    fig = heatmap_figure(torch.rand(6, 64), xlabel="expert", ylabel="layer", title="expert load, step 3",
                         cbar_label="fraction of routed pairs")
    img = figure_to_array(fig)
    assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) > 200
    assert fig.axes[0].get_xlabel() == "expert" and fig.axes[0].get_ylabel() == "layer"
    assert fig.axes[0].get_title() == "expert load, step 3"
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "fraction of routed pairs"
    assert len(fig.axes[0].get_xticks()) <= 16  # thinned for 64 experts
    iou = heatmap_figure([[1.0, 0.25], [0.25, 1.0]], xlabel="group", ylabel="group", title="iou", cbar_label="IoU",
                         xticklabels=["text", "image_und"], yticklabels=["text", "image_und"], annotate=True,
                         vmin=0, vmax=1)
    assert [t.get_text() for t in iou.axes[0].texts] == ["1.00", "0.25", "0.25", "1.00"]
    save_png(iou, tmp_path / "iou.png")
    assert (tmp_path / "iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = lines_figure({"text": [1.0, 0.5, 0.2], "image": [0.9, 0.8, 0.7]}, x=[1, 2, 3], xlabel="layer",
                         ylabel="normalised entropy", title="entropy")
    assert len(lines.axes[0].lines) == 2 and figure_to_array(lines).shape[2] == 3
