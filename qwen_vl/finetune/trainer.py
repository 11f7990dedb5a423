"""The training loop: full, LoRA or Q-LoRA fine-tuning, on one process or under torchrun.

Each optimizer step takes ``gradient_accumulation_steps`` micro-batches per
process. The loss is the sum of the token losses of the whole global batch
divided by its number of trained tokens (counted over every process before the
backward passes), so N processes with batch b reach the same weights as one
process with batch N x b, and padding or micro-batch boundaries change nothing.

Every ``save_steps`` steps a checkpoint (trainable weights, optimizer, scheduler,
RNG states of every rank, data position) is written atomically; ``resume=True``
continues from the newest one exactly as if the run had never stopped.

Several processes replicate the model (DistributedDataParallel) or shard it:
``fsdp`` (torch FSDP2, :mod:`.sharding`) or ``deepspeed`` (ZeRO, :mod:`.deepspeed_engine`).
The loss math is the same in all four.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..model.saving import atomic_write
from ..tokenizer import QWenTokenizer
from . import deepspeed_engine, sharding
from .batch_order import ResumableBatchSampler
from .checkpoints import (
    TrainState,
    gather_rng_states,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .dataset import SupervisedDataset, collate
from .deepspeed_config import load_config, resolve_config
from .distributed import ProcessInfo, all_reduce_sum, barrier, init_processes
from .look_loss import LookLoss
from .loss_log import LossLog
from .loss_vocab import LossVocabulary
from .model_setup import prepare_model
from .oom import explain_oom, is_oom
from .outputs import save_final
from .progress import TrainingProgress
from .schedule import make_scheduler
from .settings import FinetuneSettings
from .supervised import IGNORE_INDEX
from .validation import validate_data

SCALER_FILE = "scaler.pt"  # float16 loss-scaler state, in checkpoints


class TrainingOutOfMemory(RuntimeError):
    """Training ran out of memory; the message names the options that lower it."""


@dataclass
class TrainResult:
    output_dir: Path
    mode: str
    global_step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this run
    look_losses: list[float] = field(default_factory=list)  # per step with look targets (--look-loss-weight)
    tokens_seen: int = 0
    tokens_per_s: float = 0.0
    final_dir: Path | None = None
    resumed_from: Path | None = None


def train(settings: FinetuneSettings, *, stream: TextIO | None = None, quiet: bool = False) -> TrainResult:
    """Fine-tune ``settings.model`` on ``settings.data``; see ``docs/finetune.md``."""
    try:
        return _Run(settings, stream, quiet).run()
    except Exception as e:
        if is_oom(e):
            raise TrainingOutOfMemory(explain_oom(e, settings.as_dict())) from e
        raise


class _Run:
    def __init__(self, settings: FinetuneSettings, stream: TextIO | None, quiet: bool) -> None:
        self.s = settings
        self.stream, self.quiet = stream, quiet
        self.out = Path(settings.output_dir)
        self.proc: ProcessInfo = init_processes(settings.device)
        self.engine = None  # the DeepSpeed engine under --deepspeed
        self.scaler: torch.amp.GradScaler | None = None  # float16 loss scaling
        self.loss_vocab: LossVocabulary | None = None  # --loss-vocab data
        self.look: LookLoss | None = None  # --look-loss-weight
        self._look_sum, self._look_count = 0.0, 0

    # ----- setup -------------------------------------------------------------
    def run(self) -> TrainResult:
        s, proc = self.s, self.proc
        tokenizer = QWenTokenizer.from_pretrained(s.model)
        examples, _ = validate_data(
            s.data,
            tokenizer,
            model_max_length=s.model_max_length,
            truncation=s.truncation,
            image_root=s.image_root,
            system=s.system,
            skip_bad=s.skip_bad,
            report_path=self.out / "data_report.json" if proc.is_main else None,
        )
        if s.look_loss_weight > 0 and not any(e.look for e in examples):
            raise ValueError("--look-loss-weight: no answer in the data gives 'regions' (see docs/finetune.md)")
        if proc.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(s.as_dict(), indent=2, ensure_ascii=False) + "\n"
            atomic_write(self.out / "settings.json", lambda p: p.write_text(text, encoding="utf-8"))
        torch.manual_seed(s.seed)
        tm = prepare_model(s, proc.device)
        self.tm = tm
        if tm.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(proc.device.type)
        image_size = int(tm.core.config.visual["image_size"])
        self.loss_vocab = (
            LossVocabulary.from_sequences([e.input_ids for e in examples], tm.core.config.vocab_size).to(proc.device)
            if s.loss_vocab == "data"
            else None
        )
        if s.look_loss_weight > 0:
            self.look = LookLoss(tm.core, s.look_loss_layer, s.look_loss_heads)
        dataset = SupervisedDataset(examples, image_size)
        sampler = ResumableBatchSampler(
            len(dataset),
            s.batch_size,
            seed=s.seed,
            lengths=dataset.lengths if s.group_by_length else None,
            num_replicas=proc.world_size,
            rank=proc.rank,
        )
        if not sampler.batches():
            raise ValueError(
                f"{len(dataset)} usable records cannot fill one global batch of "
                f"{s.batch_size * proc.world_size} (--batch-size x processes)"
            )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=partial(collate, pad_id=tokenizer.eod_id),
            generator=torch.Generator().manual_seed(s.seed),
            num_workers=s.dataloader_workers,
            persistent_workers=s.dataloader_workers > 0,
        )
        micro_per_epoch = len(sampler.batches())
        steps_per_epoch = math.ceil(micro_per_epoch / s.gradient_accumulation_steps)
        total_steps = s.max_steps or s.epochs * steps_per_epoch
        if s.fsdp or s.deepspeed is not None:
            sharding.ensure_process_group(proc.device)
        if s.fsdp:
            sharding.shard_model(tm.core, tm.dtype)
        params = [p for p in tm.core.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            groups, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_epsilon
        )

        def schedule(opt: torch.optim.Optimizer):
            return make_scheduler(opt, s.lr_scheduler, total_steps=total_steps, warmup_ratio=s.warmup_ratio)

        model = tm.core
        if s.deepspeed is not None:
            raw, source = load_config(s.deepspeed)
            hidden = int(tm.core.config.hidden_size)
            config = resolve_config(
                raw, s, world_size=proc.world_size, dtype=tm.dtype, hidden_size=hidden, source=source
            )
            model = self.engine = deepspeed_engine.start_engine(
                tm.core, groups, optimizer, schedule, config, proc.device
            )
            optimizer, scheduler = self.engine.optimizer, self.engine.lr_scheduler
        else:
            scheduler = schedule(optimizer)
        state = TrainState(sampler_seed=s.seed)
        resumed_from = latest_checkpoint(self.out) if s.resume else None
        if resumed_from is not None:
            state = self._resume(resumed_from, optimizer, scheduler)
        if proc.distributed and not s.fsdp and s.deepspeed is None:
            ids = [proc.device.index] if proc.device.type == "cuda" else None
            model = DistributedDataParallel(tm.core, device_ids=ids)
        log = LossLog(self.out, resume_step=state.global_step) if proc.is_main else None
        progress = TrainingProgress(
            total_steps, self.stream, self.quiet or not proc.is_main, start_step=state.global_step
        )
        result = TrainResult(self.out, s.mode(), state.global_step, total_steps, resumed_from=resumed_from)
        try:
            self._loop(model, loader, sampler, optimizer, scheduler, state, total_steps, log, progress, result)
        finally:
            progress.close()
            if log is not None:
                log.close()
        with self._whole_model():
            if proc.is_main:
                result.final_dir = save_final(tm, self.s, self.out)
                if log is not None and log.rows:
                    log.write_png()
        barrier()
        return result

    def _resume(self, path: Path, optimizer, scheduler) -> TrainState:
        """Load a checkpoint into the model, optimizer and scheduler; returns its TrainState."""
        if self.engine is not None:
            _, state = load_training_checkpoint(path, optimizer=None, scheduler=None)
            deepspeed_engine.load_engine_state(self.engine, path)  # weights, optimizer and scheduler
            return state
        if self.s.fsdp:
            full = sharding.FullOptimizerState(self.tm.core, optimizer)
            weights, state = load_training_checkpoint(path, optimizer=full, scheduler=scheduler)
            sharding.load_trainable(self.tm.core, weights, source=str(path))
            return state
        weights, state = load_training_checkpoint(path, optimizer=optimizer, scheduler=scheduler)
        self.tm.load_trainable(weights, source=path)
        if self.scaler is not None and (path / SCALER_FILE).is_file():
            self.scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
        return state

    @contextmanager
    def _whole_model(self):
        """The model with whole (unsharded) parameters inside the block, for the final save."""
        if self.s.fsdp:
            sharding.unshard_in_place(self.tm.core)
            yield
        elif self.engine is not None:
            with deepspeed_engine.gathered(list(self.tm.core.parameters())):
                yield
        else:
            yield

    # ----- the loop ------------------------------------------------------------
    def _loop(self, model, loader, sampler, optimizer, scheduler, state, total_steps, log, progress, result) -> None:
        s = self.s
        accum = s.gradient_accumulation_steps
        params = [p for p in self.tm.core.parameters() if p.requires_grad]
        model.train()
        start = time.monotonic()
        run_tokens = 0
        while state.global_step < total_steps:
            sampler.set_epoch(state.epoch)
            sampler.skip(state.batch_in_epoch)
            batches = iter(loader)
            while state.global_step < total_steps:
                window = [b for _, b in zip(range(accum), batches)]
                if not window:
                    break
                loss, tokens = self._step(model, window, params)
                if self.engine is None:  # the DeepSpeed engine steps in _step
                    self._optimizer_step(optimizer, params)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.batch_in_epoch += len(window)
                state.tokens_seen += tokens
                run_tokens += tokens
                result.global_step = state.global_step
                result.losses.append(loss)
                if self._look_count:
                    result.look_losses.append(self._look_sum / self._look_count)
                    self._look_sum, self._look_count = 0.0, 0
                elapsed = time.monotonic() - start
                tokens_per_s = run_tokens / max(elapsed, 1e-9)
                lr = scheduler.get_last_lr()[0]
                epoch = state.epoch + state.batch_in_epoch / max(len(sampler.batches()), 1)
                if state.global_step % s.logging_steps == 0 or state.global_step == total_steps:
                    if log is not None:
                        log.log(state.global_step, epoch, loss, lr, state.tokens_seen, tokens_per_s, elapsed)
                    progress.update(state.global_step, loss, lr, tokens_per_s)
                if s.save_steps and state.global_step % s.save_steps == 0 and state.global_step < total_steps:
                    self._save(optimizer, scheduler, state, log)
            else:
                break  # the last step came before the end of this epoch
            state.epoch += 1
            state.batch_in_epoch = 0
        result.tokens_seen = state.tokens_seen
        result.tokens_per_s = run_tokens / max(time.monotonic() - start, 1e-9)

    def _step(self, model, window: list[dict], params: list[torch.nn.Parameter]) -> tuple[float, int]:
        """Forward and backward over one window of micro-batches; returns (loss, tokens)."""
        proc, device = self.proc, self.proc.device
        trained_per_batch = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window]
        trained = torch.tensor(sum(trained_per_batch), device=device)
        tokens = torch.tensor(sum(int(b["attention_mask"].sum()) for b in window), device=device)
        all_reduce_sum(trained)
        all_reduce_sum(tokens)
        denominator = trained.clamp(min=1).double()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for j, batch in enumerate(window):
            last = j == len(window) - 1
            # DDP, FSDP and DeepSpeed average gradients over processes: ``* world_size`` undoes their 1/N.
            if self.engine is not None:
                self.engine.set_gradient_accumulation_boundary(last)  # also for a short last window
                micro, objective = self._micro_loss(self.engine, batch, trained_per_batch[j])
                self.engine.backward(objective * proc.world_size / denominator, scale_wrt_gas=False)
                self.engine.step()  # the optimizer, clipping and scheduler step on the boundary only
            else:
                sharding.set_gradient_sync(model, last)
                sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
                with sync:
                    micro, objective = self._micro_loss(model, batch, trained_per_batch[j])
                    scaled = objective * proc.world_size / denominator
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += micro.detach().double()
        all_reduce_sum(loss_sum)
        return float(loss_sum / denominator), int(tokens)

    def _optimizer_step(self, optimizer, params: list[torch.nn.Parameter]) -> None:
        """Clip (after unscaling float16 gradients) and step; a scaled step with inf/NaN gradients is skipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.s.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def _micro_loss(self, model, batch: dict, trained: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the token losses of one micro-batch, and the objective to differentiate: the same
        plus, under ``--look-loss-weight w``, ``w * look loss * trained`` (the micro-batch's trained tokens)
        (so that after the division by the window's trained tokens it weighs like a mean)."""
        device, dtype = self.proc.device, self.tm.dtype
        images = [im.to(device, dtype) for im in batch["images"]] if batch["images"] else None
        look = self.look if self.look is not None and batch.get("look") else None
        if look is not None:
            look.arm(batch["look"])
        mixed = self.tm.autocast
        with torch.autocast(device.type, dtype=mixed) if mixed is not None else nullcontext():
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                images=images,
                labels=batch["labels"].to(device),
                loss_reduction="sum",
                compute_logits=False,  # lm_head runs on the trained positions only
                loss_vocab=self.loss_vocab,
            )
        loss = out.loss.float()
        look_loss = look.take() if look is not None else None
        if look_loss is None:
            return loss, loss
        self._look_sum += float(look_loss.detach())
        self._look_count += 1
        return loss, loss + self.s.look_loss_weight * look_loss * trained

    def _save(self, optimizer, scheduler, state: TrainState, log: LossLog | None) -> None:
        rng = gather_rng_states()
        extra: dict[str, Path] = {}
        if self.engine is not None:  # collectives first, on every rank
            weights = deepspeed_engine.gather_trainable(self.tm.core)
            extra[deepspeed_engine.ENGINE_DIR] = deepspeed_engine.save_engine_state(
                self.engine, self.out, state.global_step
            )
            optimizer = None  # inside the engine's state
        elif self.s.fsdp:
            weights = sharding.gather_trainable(self.tm.core)
            optimizer = sharding.Snapshot(sharding.FullOptimizerState(self.tm.core, optimizer).state_dict())
        else:
            weights = self.tm.trainable_state() if self.proc.is_main else {}
        files: dict[str, bytes | str | Path] = dict(extra)
        if self.scaler is not None:
            buffer = io.BytesIO()
            torch.save(self.scaler.state_dict(), buffer)
            files[SCALER_FILE] = buffer.getvalue()
        if self.proc.is_main:
            save_training_checkpoint(
                self.out,
                state.global_step,
                model_state=weights,
                optimizer=optimizer,
                scheduler=scheduler,
                train_state=state,
                keep_last=self.s.save_total_limit,
                rng_states=rng,
                extra_files=files,
                is_main_process=True,
            )
            for staging in extra.values():
                shutil.rmtree(staging, ignore_errors=True)
            if log is not None and log.rows:
                log.write_png()
        barrier()
