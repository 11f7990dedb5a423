"""Training state: checkpoints (atomic, rotated, exact resume, kill-safe), the resumable
data order, learning-rate schedules, the loss log (CSV + PNG) and the out-of-memory message."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from qwen_vl.finetune.batch_order import ResumableBatchSampler, resumable_batch_order
from qwen_vl.finetune.checkpoints import (
    TrainingCheckpointError,
    TrainState,
    capture_rng_state,
    clean_stale,
    gather_rng_states,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    save_training_checkpoint,
)
from qwen_vl.finetune.loss_log import COLUMNS, LossLog, nice_ticks, read_loss_csv
from qwen_vl.finetune.oom import explain_oom, is_oom
from qwen_vl.finetune.schedule import make_scheduler

# A complete tiny training run, used in-process (imported) and as a script (killed and resumed).
TRAIN_SCRIPT = '''
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qwen_vl.finetune.batch_order import ResumableBatchSampler
from qwen_vl.finetune.checkpoints import TrainState, latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from qwen_vl.finetune.loss_log import LossLog
from qwen_vl.finetune.schedule import make_scheduler

ITEMS, BATCH, EPOCHS, SEED = 30, 4, 3, 1234  # 8 batches per epoch (the last holds 2 items): 24 steps


def train(out_dir, *, save_every, keep_last=None, resume=False, init_seed=0, step_delay=0.0):
    """Train; return the losses of the steps run here."""
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ITEMS, 8, generator=g)
    data = TensorDataset(x, x[:, :4].sum(1, keepdim=True) - x[:, 4:].sum(1, keepdim=True))
    sampler = ResumableBatchSampler(ITEMS, BATCH, seed=SEED, lengths=[i % 7 for i in range(ITEMS)])
    scheduler = make_scheduler(optimizer, "cosine", total_steps=EPOCHS * len(sampler), warmup_steps=3, min_lr_ratio=0.1)
    loader = DataLoader(data, batch_sampler=sampler, generator=torch.Generator().manual_seed(0))
    state, checkpoint = TrainState(sampler_seed=SEED), latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        weights, state = load_training_checkpoint(checkpoint, optimizer=optimizer, scheduler=scheduler)
        model.load_state_dict(weights)
    else:
        torch.manual_seed(1)
    log = LossLog(out_dir, resume_step=state.global_step if checkpoint is not None else None)
    losses = []
    start = time.perf_counter()
    for epoch in range(state.epoch, EPOCHS):
        if epoch != state.epoch:
            state.epoch, state.batch_in_epoch = epoch, 0
        sampler.set_epoch(epoch)
        sampler.skip(state.batch_in_epoch)
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            state.global_step += 1
            state.batch_in_epoch += 1
            state.tokens_seen += x.shape[0]
            losses.append(loss.item())
            elapsed = time.perf_counter() - start
            log.log(state.global_step, epoch, loss.item(), lr, state.tokens_seen, state.tokens_seen / elapsed, elapsed)
            print(f"step {state.global_step}", flush=True)
            if state.global_step % save_every == 0:
                save_training_checkpoint(
                    out_dir, state.global_step, model_state=model.state_dict(), optimizer=optimizer,
                    scheduler=scheduler, train_state=state, keep_last=keep_last,
                )
                print(f"checkpoint {state.global_step}", flush=True)
            time.sleep(step_delay)
    log.write_png()
    log.close()
    return losses


if __name__ == "__main__":
    train(Path(sys.argv[1]), save_every=4, keep_last=2, resume="--resume" in sys.argv, step_delay=float(sys.argv[2]))
'''

SAVE_LOOP_SCRIPT = """
import sys
import torch
from qwen_vl.finetune.checkpoints import TrainState, latest_checkpoint, save_training_checkpoint

out = sys.argv[1]
latest = latest_checkpoint(out)
start = int(latest.name.split("-")[1]) + 1 if latest else 1
weights = {f"layer{i}.weight": torch.full((256, 1024), float(i)) for i in range(8)}  # 8 MiB
optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
for step in range(start, 10**6):
    save_training_checkpoint(out, step, model_state=weights, optimizer=optimizer, scheduler=None,
                             train_state=TrainState(global_step=step), keep_last=2)
    print(step, flush=True)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The training script as a module (``tiny.train``) with its path (``tiny.__file__``)."""
    path = tmp_path_factory.mktemp("script") / "train_tiny.py"
    path.write_text(TRAIN_SCRIPT, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """An uninterrupted run that keeps every checkpoint (every 4 steps)."""
    out = tmp_path_factory.mktemp("full")
    return out, tiny.train(out, save_every=4)


def curve(path: Path) -> list[tuple]:
    """The run-dependent columns of loss.csv (timing columns left out)."""
    return [(r.step, r.epoch, r.loss, r.lr, r.tokens) for r in read_loss_csv(path / "loss.csv")]


def small_checkpoint(out: Path, step: int, **kwargs) -> Path:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    return save_training_checkpoint(
        out,
        step,
        model_state={"w": torch.full((2, 3), float(step))},
        optimizer=optimizer,
        scheduler=None,
        train_state=TrainState(global_step=step),
        **kwargs,
    )


# ---------------------------------------------------------------- exact resume


def test_uninterrupted_run_learns_and_keeps_every_checkpoint(full_run) -> None:
    out, losses = full_run
    assert len(losses) == 24
    assert sum(losses[-4:]) < sum(losses[:4])
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{s}" for s in (4, 8, 12, 16, 20, 24)]
    assert [r[0] for r in curve(out)] == list(range(1, 25))


@pytest.mark.parametrize("step", [4, 8, 12, 20])  # 8 and 16 end an epoch; 4, 12, 20 are inside one
def test_resume_continues_bit_for_bit(tiny, full_run, tmp_path: Path, step: int) -> None:
    out, losses = full_run
    shutil.copytree(out / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    shutil.copy(out / "loss.csv", tmp_path / "loss.csv")  # holds rows past `step`: they are dropped
    resumed = tiny.train(tmp_path, save_every=4, resume=True, init_seed=99)  # other initial weights
    assert resumed == losses[step:]  # float equality: bit for bit
    assert curve(tmp_path) == curve(out)


@pytest.mark.parametrize("leave_out", ["rng", "data position"])
def test_resume_without_rng_or_data_position_differs(
    tiny, full_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leave_out: str
) -> None:
    """Controls: the exact-resume test can fail."""
    out, losses = full_run
    shutil.copytree(out / "checkpoint-12", tmp_path / "checkpoint-12")
    state = load_training_checkpoint(tmp_path / "checkpoint-12", optimizer=None, scheduler=None)[1]
    assert (state.global_step, state.epoch, state.batch_in_epoch, state.sampler_seed) == (12, 1, 4, 1234)
    if leave_out == "rng":
        load = tiny.load_training_checkpoint
        monkeypatch.setattr(tiny, "load_training_checkpoint", lambda *a, **k: load(*a, **k, restore_rng=False))
    else:
        monkeypatch.setattr(tiny.ResumableBatchSampler, "skip", lambda self, n: None)
    assert tiny.train(tmp_path, save_every=4, resume=True)[:12] != losses[12:]


def run_script(script: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(out), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen, line: str) -> None:
    for got in proc.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"process ended before printing {line!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_curve(tiny, tmp_path: Path) -> None:
    script = Path(tiny.__file__)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = run_script(script, whole, "0")
    victim = run_script(script, killed, "0.2")
    wait_for(victim, "checkpoint 12")
    wait_for(victim, "step 14")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed).name in ("checkpoint-12", "checkpoint-16", "checkpoint-20")
    assert max(r.step for r in read_loss_csv(killed / "loss.csv")) >= 14
    resumed = run_script(script, killed, "0", "--resume")
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    assert curve(killed) == curve(whole)
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-20", "checkpoint-24"]
    assert Image.open(killed / "loss.png").size == (800, 480)


@pytest.mark.slow
def test_sigkill_during_saves_leaves_loadable_checkpoints(tmp_path: Path) -> None:
    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP_SCRIPT, encoding="utf-8")
    out = tmp_path / "out"
    rng = random.Random(0)
    for _ in range(3):
        latest = latest_checkpoint(out)
        proc = run_script(script, out)
        wait_for(proc, str(int(latest.name.split("-")[1]) + 2 if latest else 2))  # two saves in this run
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        found = list_checkpoints(out)
        assert 1 <= len(found) <= 3  # keep_last=2, plus the new one while the oldest is being removed
        for path in found:
            weights, state = load_training_checkpoint(path, optimizer=None, scheduler=None)
            assert torch.equal(weights["layer7.weight"], torch.full((256, 1024), 7.0))
            assert path.name == f"checkpoint-{state.global_step}"
    small_checkpoint(out, 10**7)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the next save clears the leftovers


# ---------------------------------------------------------------- checkpoint files


def test_checkpoint_layout_and_contents(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, "linear", total_steps=10, warmup_steps=2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    state = TrainState(global_step=7, epoch=1, batch_in_epoch=3, tokens_seen=999, sampler_seed=5)
    path = save_training_checkpoint(
        tmp_path / "run",
        7,
        model_state=model.state_dict(),
        optimizer=optimizer,
        scheduler=scheduler,
        train_state=state,
        extra_files={"notes.txt": b"hello", "adapter": tmp_path / "adapter"},
    )
    assert path == tmp_path / "run" / "checkpoint-7"
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    expected = ["adapter/adapter_config.json", "complete", "model.safetensors", "notes.txt", "optimizer.pt"]
    assert names == sorted(expected + ["rng_state.pt", "scheduler.pt", "train_state.json"])
    manifest = json.loads((path / "complete").read_text())
    assert manifest["step"] == 7 and manifest["files"]["notes.txt"] == 5 and "complete" not in manifest["files"]
    assert json.loads((path / "train_state.json").read_text())["tokens_seen"] == 999

    model2 = torch.nn.Linear(3, 2)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    scheduler2 = make_scheduler(optimizer2, "cosine", total_steps=99)
    weights, loaded = load_training_checkpoint(path, optimizer=optimizer2, scheduler=scheduler2)
    assert loaded == state
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert scheduler2.state_dict() == scheduler.state_dict()  # the schedule's own parameters came back too
    exp_avg = optimizer2.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, optimizer.state_dict()["state"][0]["exp_avg"])


def test_rng_states_come_back_per_rank(tmp_path: Path) -> None:
    def seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    assert len(gather_rng_states()) == 1
    seed_all(1)
    rank0 = capture_rng_state()
    seed_all(2)
    rank1 = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = small_checkpoint(tmp_path, 1, rng_states=[rank0, rank1])
    seed_all(3)
    load_training_checkpoint(path, optimizer=None, scheduler=None, rank=1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with pytest.warns(UserWarning, match="rank 2 keeps its own"):
        load_training_checkpoint(path, optimizer=None, scheduler=None, rank=2)


def test_shared_tensors_and_only_main_process_writes(tmp_path: Path) -> None:
    emb = torch.randn(4, 3)
    state = {"wte.weight": emb, "lm_head.weight": emb, "half": emb[:2]}  # tied and sliced views
    path = save_training_checkpoint(
        tmp_path, 1, model_state=state, optimizer=None, scheduler=None, train_state=TrainState()
    )
    weights, _ = load_training_checkpoint(path, optimizer=None, scheduler=None)
    assert all(torch.equal(weights[k], v) for k, v in state.items())
    none = save_training_checkpoint(
        tmp_path / "other",
        1,
        model_state=state,
        optimizer=None,
        scheduler=None,
        train_state=TrainState(),
        is_main_process=False,
    )
    assert none is None and not (tmp_path / "other").exists()


def test_rotation_keeps_the_last_and_the_one_just_written(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        small_checkpoint(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    (tmp_path / "checkpoint-10").mkdir()  # no `complete`: not counted, not deleted
    small_checkpoint(tmp_path, 3, keep_last=1)  # older than the rest, but just written
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-8"]
    assert (tmp_path / "checkpoint-10").is_dir() and latest_checkpoint(tmp_path).name == "checkpoint-8"
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        small_checkpoint(tmp_path, 9, keep_last=0)


def test_same_step_is_replaced_and_stale_dirs_are_cleaned(tmp_path: Path) -> None:
    small_checkpoint(tmp_path, 5)
    (tmp_path / ".checkpoint-6.tmp-abc").mkdir()
    (tmp_path / ".checkpoint-6.tmp-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".checkpoint-1.old-1-2").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    save_training_checkpoint(
        tmp_path,
        5,
        model_state={"w": torch.zeros(1)},
        optimizer=optimizer,
        scheduler=None,
        train_state=TrainState(global_step=5, epoch=9),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    weights, state = load_training_checkpoint(tmp_path / "checkpoint-5", optimizer=None, scheduler=None)
    assert state.epoch == 9 and weights["w"].shape == (1,)
    assert clean_stale(tmp_path) == [] and latest_checkpoint(tmp_path / "missing") is None


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_checkpoint(tmp_path, 1)

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qwen_vl.finetune.checkpoints.os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        small_checkpoint(tmp_path, 2, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path, 3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    scheduler = make_scheduler(optimizer, total_steps=3)

    with pytest.raises(TrainingCheckpointError, match=re.escape(str(path / "scheduler.pt")) + ": missing"):
        load_training_checkpoint(path, optimizer=optimizer, scheduler=scheduler)

    data = (path / "optimizer.pt").read_bytes()
    (path / "optimizer.pt").write_bytes(b"\0" * len(data))  # same size, unreadable
    with pytest.raises(TrainingCheckpointError, match=re.escape(str(path / "optimizer.pt")) + ": cannot be read"):
        load_training_checkpoint(path, optimizer=optimizer, scheduler=None)

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(TrainingCheckpointError, match=re.escape(str(weights)) + r": \d+ bytes, .* lists \d+"):
        load_training_checkpoint(path, optimizer=None, scheduler=None)

    (path / "complete").unlink()
    with pytest.raises(TrainingCheckpointError, match=re.escape(str(path / "complete")) + ": missing"):
        load_training_checkpoint(path, optimizer=None, scheduler=None)
    assert latest_checkpoint(tmp_path) is None

    with pytest.raises(TrainingCheckpointError, match="not a checkpoint directory"):
        load_training_checkpoint(tmp_path / "checkpoint-4", optimizer=None, scheduler=None)
    with pytest.raises(TrainingCheckpointError, match="state.json: fields epoch must be integers"):
        TrainState.from_json(
            '{"global_step": 1, "epoch": "x", "batch_in_epoch": 0, "tokens_seen": 0, "sampler_seed": 0}', "state.json"
        )


@pytest.mark.parametrize("name", ["../x", "/abs", "complete", "optimizer.pt/y"])
def test_extra_file_names_stay_inside(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="extra file name"):
        small_checkpoint(tmp_path, 1, extra_files={name: b"x"})
    assert list_checkpoints(tmp_path) == [] and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- data order


def test_batch_order_is_a_function_of_seed_and_epoch() -> None:
    order = resumable_batch_order(10, 3, seed=7, epoch=2)
    assert order == resumable_batch_order(10, 3, seed=7, epoch=2)
    assert order != resumable_batch_order(10, 3, seed=7, epoch=3)
    assert order != resumable_batch_order(10, 3, seed=8, epoch=2)
    assert [len(b) for b in order] == [3, 3, 3, 1] and sorted(sum(order, [])) == list(range(10))
    assert [len(b) for b in resumable_batch_order(10, 3, seed=7, epoch=2, drop_last=True)] == [3, 3, 3]


def test_batch_order_replicas_split_the_single_process_batches() -> None:
    single = resumable_batch_order(21, 4, seed=3, epoch=0)  # last global batch of 1 item
    ranks = [resumable_batch_order(21, 2, seed=3, epoch=0, num_replicas=2, rank=r) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == single[:-1]  # the incomplete last global batch is dropped
    with pytest.raises(ValueError, match="rank"):
        resumable_batch_order(21, 2, seed=3, epoch=0, num_replicas=2, rank=2)


def test_length_grouped_batches_hold_similar_lengths() -> None:
    lengths = [random.Random(i).randint(1, 1000) for i in range(400)]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = resumable_batch_order(400, 8, seed=0, epoch=0, lengths=lengths, group_size=10)
    plain = resumable_batch_order(400, 8, seed=0, epoch=0)
    assert sorted(sum(grouped, [])) == list(range(400))
    assert padding(grouped) * 5 < padding(plain)
    assert grouped == resumable_batch_order(400, 8, seed=0, epoch=0, lengths=lengths, group_size=10)
    with pytest.raises(ValueError, match="lengths has 3 entries for 400 items"):
        resumable_batch_order(400, 8, seed=0, epoch=0, lengths=[1, 2, 3])


def test_sampler_skip_applies_to_one_pass() -> None:
    sampler = ResumableBatchSampler(12, 2, seed=1)
    sampler.set_epoch(4)
    full = list(sampler)
    assert full == resumable_batch_order(12, 2, seed=1, epoch=4) and len(sampler) == 6
    sampler.skip(4)
    assert len(sampler) == 2 and list(sampler) == full[4:]
    assert list(sampler) == full


# ---------------------------------------------------------------- schedules


def lrs(kind: str, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_scheduler(optimizer, kind, **kwargs)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_with_warmup_by_hand() -> None:
    got = lrs("cosine", 13, total_steps=10, warmup_steps=2)
    assert got[:3] == [0.0, 1.0, 2.0]  # 2.0 * step / warmup, then the peak
    assert got[6] == pytest.approx(1.0)  # halfway through the decay: cos(pi/2)
    assert got[4] == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert got[10:] == pytest.approx([0.0, 0.0, 0.0])  # stays at the floor after total_steps
    floor = lrs("cosine", 12, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert floor[6] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5)) and floor[10:] == pytest.approx([0.2, 0.2])


def test_linear_and_constant_by_hand() -> None:
    assert lrs("linear", 7, total_steps=5, warmup_ratio=0.2) == pytest.approx([0.0, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0])
    assert lrs("constant", 5, total_steps=4, warmup_steps=3) == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0, 2.0])
    assert lrs("linear", 3, total_steps=4, warmup_steps=0, min_lr_ratio=0.5)[2] == pytest.approx(1.5)


def test_schedules_match_transformers() -> None:
    import transformers

    for kind, make in [
        ("cosine", transformers.get_cosine_schedule_with_warmup),
        ("linear", transformers.get_linear_schedule_with_warmup),
    ]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        reference = make(optimizer, num_warmup_steps=7, num_training_steps=50)
        expected = [reference.lr_lambdas[0](s) for s in range(51)]
        ours = make_scheduler(optimizer, kind, total_steps=50, warmup_steps=7).lr_lambdas[0]
        assert [ours(s) for s in range(51)] == pytest.approx(expected, abs=1e-12)


def test_schedule_arguments_are_checked() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for kwargs, message in [
        ({"kind": "step", "total_steps": 5}, "must be one of cosine, linear, constant"),
        ({"total_steps": 0}, "total_steps must be >= 1"),
        ({"total_steps": 5, "warmup_steps": 6}, r"warmup_steps must be in \[0, total_steps=5\]"),
        ({"total_steps": 5, "warmup_steps": 1, "warmup_ratio": 0.1}, "not both"),
        ({"total_steps": 5, "warmup_ratio": 1.5}, "warmup_ratio must be in"),
        ({"total_steps": 5, "min_lr_ratio": -0.1}, "min_lr_ratio must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_scheduler(optimizer, **kwargs)


# ---------------------------------------------------------------- loss log


def test_loss_csv_rows_and_exact_floats(tmp_path: Path) -> None:
    loss = torch.tensor(0.1234567, dtype=torch.float32).item()
    with LossLog(tmp_path) as log:
        log.log(1, 0, loss, 1e-5, 128, 1000.5, 0.25)
        log.log(2, 0.5, 2.0, 2e-5, 256, 999, 0.5)
        assert (tmp_path / "loss.csv").read_text().count("\n") == 3  # flushed as written
    text = (tmp_path / "loss.csv").read_text()
    assert text.splitlines() == [
        ",".join(COLUMNS),
        f"1,0.0,{loss!r},1e-05,128,1000.5,0.25",
        "2,0.5,2.0,2e-05,256,999.0,0.5",
    ]
    assert read_loss_csv(tmp_path / "loss.csv")[0].loss == loss
    with pytest.raises(ValueError, match="the log is closed"):
        log.log(3, 1, 1.0, 1.0, 1, 1.0, 1.0)


def test_loss_csv_resume_truncates_and_fresh_start_clears(tmp_path: Path) -> None:
    with LossLog(tmp_path) as log:
        for step in range(1, 8):
            log.log(step, 0, 1.0 / step, 1e-4, step, 1.0, step)
    with open(tmp_path / "loss.csv", "a") as f:
        f.write("8,0.0,0.12")  # a row cut short by a kill
    with LossLog(tmp_path, resume_step=4) as log:
        assert [r.step for r in log.rows] == [1, 2, 3, 4]
        log.log(5, 0, 9.0, 1e-4, 5, 1.0, 5)
    assert [(r.step, r.loss) for r in read_loss_csv(tmp_path / "loss.csv")][-2:] == [(4, 0.25), (5, 9.0)]
    with LossLog(tmp_path) as log:
        assert log.rows == []
    assert (tmp_path / "loss.csv").read_text() == ",".join(COLUMNS) + "\n"
    (tmp_path / "loss.csv").write_text(",".join(COLUMNS) + "\n1,2,x,4,5,6,7\n")
    with pytest.raises(ValueError, match=r"loss.csv:2: bad row"):
        LossLog(tmp_path, resume_step=3)


def test_loss_png(tmp_path: Path) -> None:
    with LossLog(tmp_path) as log:
        assert Image.open(log.write_png()).size == (800, 480)  # no rows yet: an empty frame
        for step in range(1, 31):
            log.log(step, step / 10, 2.0 * math.exp(-step / 8) + (float("nan") if step == 5 else 0.0), 1e-4, 1, 1, 1)
        path = log.write_png(tmp_path / "curve.png", size=(640, 400))
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (640, 400)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    curve_blue = (abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 40).sum()
    dark = (pixels.sum(axis=2) < 200).sum()  # axes, ticks and numbers
    assert curve_blue > 300 and dark > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nice_ticks() -> None:
    assert nice_ticks(0.13, 2.9) == [0.0, 1.0, 2.0, 3.0]
    assert nice_ticks(1, 39, 6, integer=True) == [0, 10, 20, 30, 40]
    assert nice_ticks(0.51, 0.74, 5) == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    assert nice_ticks(5, 5, integer=True)[0] < 5 < nice_ticks(5, 5, integer=True)[-1]


# ---------------------------------------------------------------- out of memory

SETTINGS = {
    "batch_size": 6,
    "gradient_accumulation_steps": 4,
    "model_max_length": 2048,
    "gradient_checkpointing": False,
    "lora": True,
    "q_lora": False,
    "fix_vit": True,
    "deepspeed": None,
    "precision": "fp32",
}


def test_cuda_oom_message_names_options_and_current_values() -> None:
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")
    message = explain_oom(exc, SETTINGS)
    assert message.startswith("Out of memory on the GPU: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00")
    assert "more details" not in message
    for text in [
        "--batch-size 6, --gradient-accumulation-steps 4, --model-max-length 2048, --gradient-checkpointing off",
        "mode LoRA, --fix-vit on, --deepspeed not set, precision fp32",
        "--batch-size 3 --gradient-accumulation-steps 8: smaller micro-batches, same global batch (6 x 4 = 3 x 8 = 24",
        "--model-max-length: shorter sequences (e.g. 1024)",
        "--gradient-checkpointing: recompute activations",
        "--lora, or --q-lora",
        "--fix-vit: freeze the vision transformer (already on)",
        "--deepspeed with a ZeRO-3 config that offloads",
        "--bf16: bf16 weights and activations instead of fp32 (now fp32)",
    ]:
        assert text in message, text


def test_cpu_oom_is_recognised_through_wrappers() -> None:
    inner = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 9 GB")
    try:
        try:
            raise inner
        except RuntimeError as e:
            raise ValueError("step failed") from e
    except ValueError as wrapped:
        outer = wrapped
    assert is_oom(outer) and is_oom(MemoryError()) and is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of range"))
    message = explain_oom(outer, {"batch-size": 1, "bf16": True, "gradient_checkpointing": True})
    assert message.startswith("Out of memory on the CPU (host RAM): RuntimeError: [enforce fail")
    assert "--batch-size is already 1" in message and "--deepspeed" not in message.split("Options")[1]
    assert "(already on)" in message.split("--gradient-checkpointing:")[1].splitlines()[0]
    assert "--model-max-length not set" in message and "precision bf16" in message


def test_time_left_counts_from_the_first_step_of_this_run(monkeypatch):
    from qwen_vl.finetune import progress as progress_module

    clock = iter([0.0, 100.0, 0.0, 100.0])  # start, line; start, line
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    fresh = progress_module.TrainingProgress(110, quiet=True)  # logged every 10 steps
    assert "1m40s elapsed, 16m40s left" in fresh.line(10, 1.0, 1e-3, 5.0)
    resumed = progress_module.TrainingProgress(110, quiet=True, start_step=60)
    assert "1m40s elapsed, 6m40s left" in resumed.line(70, 1.0, 1e-3, 5.0)
