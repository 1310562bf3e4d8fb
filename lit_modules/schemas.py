"""Typed schemas for the Hydra config groups, registered with Hydra's ConfigStore.

A YAML in `conf/model/` or `conf/data/` lists its schema first in its defaults, so a misspelt key
(`model.net.n_layr=4`) or a wrong type (`model.net.n_layers=abc`) fails at compose time with the
full key in the message, before anything is built.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from lit_modules.base import OptimConfig
from lit_modules.data_schemas import register_data_schemas
from lit_modules.visual_tokenizer import GANConfig, TokenizerLossConfig
from models.tokenizers.audio import AudioTokenizerConfig
from models.tokenizers.semantic import AttributeClassifierConfig, FrameClassifierConfig, SemanticConfig
from models.tokenizers.visual import TokenizerConfig
from models.videoar import CFECConfig, VideoARConfig
from models.transformer import TransformerConfig
from models.ernie3 import Ernie3Config
from models.ernie5 import Ernie5Config
from lit_modules.rl import RLConfig
from lit_modules.ernie5_rl import Ernie5RLConfig
from lit_modules.refiner import RefinerSampleConfig
from models.refiner import DegradeConfig, RefinerConfig


def schema_of(cls: type) -> type:
    """A field-for-field copy of a config dataclass without its `__post_init__`.

    Hydra instantiates schema defaults; a config whose `__post_init__` fills fields from a preset
    would bake that preset's values into the schema and override the YAML's `preset`.
    """
    hints = typing.get_type_hints(cls)
    spec = []
    for f in fields(cls):
        if f.default is not MISSING:
            spec.append((f.name, hints[f.name], field(default=f.default)))
        elif f.default_factory is not MISSING:
            spec.append((f.name, hints[f.name], field(default_factory=f.default_factory)))
        else:
            spec.append((f.name, hints[f.name]))
    return make_dataclass(cls.__name__, spec)


TransformerSchema = schema_of(TransformerConfig)
OptimSchema = schema_of(OptimConfig)


@dataclass
class FSDPConfig:
    """FSDP2 options, used only under `trainer=fsdp`. mixed_precision: auto|bf16|fp16|fp32."""

    mixed_precision: str = "auto"
    activation_checkpointing: bool = False


@dataclass
class SampleConfig:
    """Text sampled from `prompt` at each validation end and logged to TensorBoard."""

    prompt: str = ""
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None


@dataclass
class LMModuleSchema:
    _target_: str = "lit_modules.lm.LanguageModelModule"
    net: TransformerSchema = field(default_factory=TransformerSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    nonfinite: str = "error"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    seed: int = 0
    init_ckpt: Optional[str] = None
    compile: bool = False
    compile_backend: str = "inductor"


TokenizerLossSchema = schema_of(TokenizerLossConfig)
GANSchema = schema_of(GANConfig)
SemanticSchema = schema_of(SemanticConfig)
VisualTokenizerNetSchema = schema_of(TokenizerConfig)


@dataclass
class VisualTokenizerModuleSchema:
    _target_: str = "lit_modules.visual_tokenizer.VisualTokenizerModule"
    net: VisualTokenizerNetSchema = field(default_factory=VisualTokenizerNetSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    loss: TokenizerLossSchema = field(default_factory=TokenizerLossSchema)
    gan: GANSchema = field(default_factory=GANSchema)
    seed: int = 0
    inflate_from: Optional[str] = None
    init_ckpt: Optional[str] = None
    log_samples: int = 4
    image_steps: int = 0
    image_batch_factor: int = 4
    clips_per_step: Optional[int] = None
    semantic: SemanticSchema = field(default_factory=SemanticSchema)


AudioTokenizerNetSchema = schema_of(AudioTokenizerConfig)


FrameClassifierSchema = schema_of(FrameClassifierConfig)
AttributeClassifierSchema = schema_of(AttributeClassifierConfig)


@dataclass
class VisualTeacherModuleSchema:
    _target_: str = "lit_modules.visual_teacher.VisualTeacherModule"
    net: AttributeClassifierSchema = field(default_factory=AttributeClassifierSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    seed: int = 0


@dataclass
class AudioTeacherModuleSchema:
    _target_: str = "lit_modules.audio_teacher.AudioTeacherModule"
    net: FrameClassifierSchema = field(default_factory=FrameClassifierSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    seed: int = 0


@dataclass
class AudioTokenizerModuleSchema:
    _target_: str = "lit_modules.audio_tokenizer.AudioTokenizerModule"
    net: AudioTokenizerNetSchema = field(default_factory=AudioTokenizerNetSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    l1: float = 1.0
    l2: float = 1.0
    seed: int = 0
    log_samples: int = 2
    semantic: SemanticSchema = field(default_factory=SemanticSchema)


VideoARNetSchema = schema_of(VideoARConfig)
CFECSchema = schema_of(CFECConfig)


@dataclass
class VideoARSampleConfig:
    num_clips: int = 4
    num_frames: int = 0
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0, 5.0])
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0


@dataclass
class VideoARModuleSchema:
    _target_: str = "lit_modules.videoar.VideoARModule"
    net: VideoARNetSchema = field(default_factory=VideoARNetSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    tokenizer_ckpt: Optional[str] = None
    scale_weighting: str = "infinity"
    cfec: CFECSchema = field(default_factory=CFECSchema)
    frame_mask_prob: float = 0.0
    frame_mask_window: Optional[int] = None
    sample: VideoARSampleConfig = field(default_factory=VideoARSampleConfig)
    seed: int = 0
    init_ckpt: Optional[str] = None
    tokenizer_scales: Optional[list] = None
    image_prob: float = 0.0
    compile: bool = False
    compile_backend: str = "inductor"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


Ernie3NetSchema = schema_of(Ernie3Config)
RLSchema = schema_of(RLConfig)


@dataclass
class Ernie3ModuleSchema:
    _target_: str = "lit_modules.ernie3.Ernie3Module"
    net: Ernie3NetSchema = field(default_factory=Ernie3NetSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    task_weights: Optional[dict] = None
    use_memory: bool = True
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    seed: int = 0
    init_ckpt: Optional[str] = None
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32))


@dataclass
class Ernie3FinetuneModuleSchema:
    _target_: str = "lit_modules.ernie3.Ernie3FinetuneModule"
    net: Optional[dict] = None
    optim: OptimSchema = field(default_factory=OptimSchema)
    init_ckpt: Optional[str] = None
    mode: str = "full"
    num_classes: int = 0
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    seed: int = 0


Ernie5NetSchema = schema_of(Ernie5Config)


@dataclass
class Ernie5SampleConfig:
    """Samples of every generation task logged to TensorBoard at validation end (num 0 = off)."""

    num: int = 2
    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    max_new_tokens: int = 48
    frame_window: Optional[int] = None  # caption -> video: earlier frames a frame attends to (None = all)


@dataclass
class Ernie5ModuleSchema:
    _target_: str = "lit_modules.ernie5.Ernie5Module"
    net: Ernie5NetSchema = field(default_factory=Ernie5NetSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    visual_tokenizer: Optional[str] = None
    audio_tokenizer: Optional[str] = None
    mtp_weight: float = 0.3
    posterior_weighting: bool = False
    posterior_decay: float = 0.99
    scale_weighting: str = "infinity"
    cfec: CFECSchema = field(default_factory=CFECSchema)
    bias_update_rate: Optional[float] = None
    frame_mask_prob: float = 0.0
    frame_mask_window: Optional[int] = None
    seed: int = 0
    init_ckpt: Optional[str] = None
    compile: bool = False
    compile_backend: str = "inductor"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    sample: Ernie5SampleConfig = field(default_factory=lambda: Ernie5SampleConfig())
    visual_tokenizer_stages: Any = None  # progressive switching: a list of tokenizers (null = the data's); Any: an interpolation


Ernie5RLSchema = schema_of(Ernie5RLConfig)


@dataclass
class Ernie5RLModuleSchema(Ernie5ModuleSchema):
    """RL post-training of ERNIE 5.0 (captioning): the policy's `net` comes from `init_ckpt`."""

    _target_: str = "lit_modules.ernie5_rl.Ernie5RLModule"
    rl: Ernie5RLSchema = field(default_factory=Ernie5RLSchema)


@dataclass
class EvalSchema:
    max_new_tokens: int = 16
    batch: int = 256


@dataclass
class SFTModuleSchema:
    _target_: str = "lit_modules.sft.SFTModule"
    net: Optional[dict] = None
    optim: OptimSchema = field(default_factory=OptimSchema)
    evaluate: EvalSchema = field(default_factory=EvalSchema)
    nonfinite: str = "error"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    seed: int = 0
    init_ckpt: Optional[str] = None
    compile: bool = False
    compile_backend: str = "inductor"


@dataclass
class RLModuleSchema(SFTModuleSchema):
    _target_: str = "lit_modules.rl.RLModule"
    rl: RLSchema = field(default_factory=RLSchema)


def _product(*values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _audio_label_count(labels, num_classes, speakers) -> int:
    from datamodules.media import audio_label_count

    return audio_label_count(str(labels), int(num_classes), int(speakers))


def _launchers_from_conf(cs: ConfigStore) -> None:
    """conf/hydra/launcher/submitit_{local,slurm}.yaml replace hydra-submitit-launcher's configs of
    the same name (they add a `trainer` field and target hydra_plugins/sparse_ar_launchers.py).

    The plugin stores its configs when Hydra scans for plugins; a YAML of the same name would then be
    merged into the plugin's schema (deprecated, and it rejects the extra field). Scanning here, once
    (Plugins is a singleton, later scans reuse it), and dropping the plugin's nodes makes the YAMLs
    the only configs of those names.
    """
    from hydra.core.plugins import Plugins

    Plugins.instance()
    launchers = cs.repo.get("hydra", {}).get("launcher", {})
    for name in ("submitit_local.yaml", "submitit_slurm.yaml"):
        launchers.pop(name, None)


RefinerNetSchema = schema_of(RefinerConfig)
DegradeSchema = schema_of(DegradeConfig)
RefinerSampleSchema = schema_of(RefinerSampleConfig)


@dataclass
class RefinerModuleSchema:
    _target_: str = "lit_modules.refiner.RefinerModule"
    net: RefinerNetSchema = field(default_factory=RefinerNetSchema)
    degrade: DegradeSchema = field(default_factory=DegradeSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    sample: RefinerSampleSchema = field(default_factory=RefinerSampleSchema)
    seed: int = 0


def register_schemas() -> None:
    """Idempotent: safe to call from train.py, generate.py and tests. Also registers `${mul:a,b}` and
    `${audio_label_count:labels,num_classes,speakers}` (how many labels the audio DataModule gives)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("mul", _product, replace=True)
    OmegaConf.register_new_resolver("audio_label_count", _audio_label_count, replace=True)
    cs = ConfigStore.instance()
    _launchers_from_conf(cs)
    cs.store(group="model", name="lm_schema", node=LMModuleSchema)
    register_data_schemas(cs)  # text / image / video / audio / tokens, derived from the constructors
    cs.store(group="model", name="visual_tokenizer_schema", node=VisualTokenizerModuleSchema)
    cs.store(group="model", name="audio_tokenizer_schema", node=AudioTokenizerModuleSchema)
    cs.store(group="model", name="audio_teacher_schema", node=AudioTeacherModuleSchema)
    cs.store(group="model", name="visual_teacher_schema", node=VisualTeacherModuleSchema)
    cs.store(group="model", name="videoar_schema", node=VideoARModuleSchema)
    cs.store(group="model", name="ernie3_schema", node=Ernie3ModuleSchema)
    cs.store(group="model", name="ernie3_finetune_schema", node=Ernie3FinetuneModuleSchema)
    cs.store(group="model", name="sft_schema", node=SFTModuleSchema)
    cs.store(group="model", name="rl_schema", node=RLModuleSchema)
    cs.store(group="model", name="ernie5_schema", node=Ernie5ModuleSchema)
    cs.store(group="model", name="ernie5_rl_schema", node=Ernie5RLModuleSchema)
    cs.store(group="model", name="refiner_schema", node=RefinerModuleSchema)
