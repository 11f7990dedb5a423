"""Every option of a fine-tuning run, checked before anything heavy starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from ..chat import DEFAULT_SYSTEM
from .lora import DEFAULT_TARGETS, LoraSettings
from .schedule import ScheduleKind
from .supervised import TRUNCATION_POLICIES

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULE_KINDS = get_args(ScheduleKind)
LOSS_VOCABS = ("full", "data")


@dataclass
class FinetuneSettings:
    """The options of ``qwen-vl finetune`` (names follow the official script's flags).

    ``batch_size`` is per process; the global batch is ``batch_size x processes x
    gradient_accumulation_steps``. ``dtype="auto"`` trains in bfloat16 on a GPU that
    supports it and in float32 otherwise. ``fsdp`` or ``deepspeed`` shard the model,
    gradients and optimizer state over the processes (see ``docs/finetune.md``).
    """

    model: str | Path
    data: list[str | Path]
    output_dir: str | Path
    image_root: str | Path | None = None
    system: str = DEFAULT_SYSTEM
    # what trains
    lora: bool = False
    q_lora: bool = False
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    train_embeddings: bool = False  # the base model: its ChatML tokens' embeddings are untrained
    fix_vit: bool = True
    train_resampler: bool = True  # False: the resampler stays frozen too (with fix_vit: the whole tower)
    # optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # data
    model_max_length: int = 2048
    truncation: str = "drop"
    skip_bad: bool = False
    group_by_length: bool = True
    loss_vocab: str = "full"  # "data": softmax over the data's tokens + sampled others (finetune.loss_vocab)
    look_loss_weight: float = 0.0  # > 0: the data's regions train one layer's attention (finetune.look_loss)
    look_loss_layer: int = 1
    look_loss_heads: int = 1
    # machinery
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    save_steps: int = 0  # 0: only the final weights
    save_total_limit: int | None = 3
    resume: bool = False
    logging_steps: int = 1
    dataloader_workers: int = 0  # processes that read pictures ahead of the training step (0: in the step)
    # sharding over the processes of a torchrun group
    fsdp: bool = False
    deepspeed: str | Path | None = None  # a JSON config, or "zero2", "zero3", "zero3_offload"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [self.data]
        self.lora_targets = tuple(self.lora_targets)
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        positive = (
            "batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "model_max_length",
            "lora_r",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "learning_rate",
            "weight_decay",
            "lora_dropout",
            "warmup_ratio",
            "max_grad_norm",
            "save_steps",
            "look_loss_weight",
            "look_loss_layer",
            "dataloader_workers",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup-ratio must be within [0, 1], got {self.warmup_ratio}")
        if self.lr_scheduler not in SCHEDULE_KINDS:
            raise ValueError(f"--lr-scheduler must be one of {', '.join(SCHEDULE_KINDS)}, got {self.lr_scheduler!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"--truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {self.truncation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.q_lora:
            self.lora = True
        if self.loss_vocab not in LOSS_VOCABS:
            raise ValueError(f"--loss-vocab must be one of {', '.join(LOSS_VOCABS)}, got {self.loss_vocab!r}")
        if self.loss_vocab != "full" and (self.lora or self.fsdp or self.deepspeed is not None):
            raise ValueError("--loss-vocab data is for full fine-tuning in one process per device without sharding")
        if self.look_loss_heads < 1:
            raise ValueError(f"--look-loss-heads must be at least 1, got {self.look_loss_heads}")
        if self.look_loss_weight > 0 and (self.fsdp or self.deepspeed is not None):
            raise ValueError("--look-loss-weight needs the whole model in each process: not with --fsdp or --deepspeed")
        if not self.data:
            raise ValueError("--data: give at least one data file")
        if self.fsdp and self.deepspeed is not None:
            raise ValueError("--fsdp and --deepspeed both shard the model: choose one")
        if self.q_lora and (self.fsdp or self.deepspeed is not None):
            raise ValueError("--q-lora trains on one GPU per process: it does not combine with --fsdp or --deepspeed")

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)

    def mode(self) -> str:
        """ "full", "lora" or "q-lora"."""
        return "q-lora" if self.q_lora else "lora" if self.lora else "full"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready options (paths as strings)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        out["data"] = [str(d) for d in self.data]
        out["lora_targets"] = list(self.lora_targets)
        return out
