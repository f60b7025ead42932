"""The one training loop: every stage (dense, SVD, sparsify, fine-tune) runs through `fit`.

Deterministic on CPU: each epoch's shuffling and augmentation come from a
generator seeded by (seed, stage, epoch), so a run resumed from the checkpoint
of epoch k repeats epochs k+1… exactly as an uninterrupted run would, as long as
its cuts are the same: cuts toward a speed target follow measured times, which
differ from run to run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from svdtrain.channels import channel_groups, resize_to_state_
from svdtrain.layers import svd_layers
from svdtrain.prune import rank_for_energy, tail_energy

from .baselines import nuclear_norm, trp_layers, trp_truncate_
from .config import RunConfig
from .data import Dataset, Split
from .distributed import Cluster
from .files import CheckpointError, load_into, load_weights, save_atomic, write_csv

STAGE_SEEDS = {"train": 1, "sparsify": 2, "finetune": 3}
DRIFT_WARNING = 0.2  # orthogonality drift above which the epoch line warns


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what was saved."""


@dataclass(frozen=True)
class StageSettings:
    """What differs between the stages that train."""

    name: str  # train | sparsify | finetune
    epochs: int
    lr: float
    lambda_o: float  # orthogonality weight (0 for a dense model)
    lambda_s: float  # sparsity weight
    lambda_c: float = 0.0  # channel sparsity weight (prune_channels)
    nuclear: float = 0.0  # TRP: nuclear-norm weight on the dense layers
    truncate_every: int = 0  # TRP: replace the dense weights by their truncated SVD every this many steps
    truncate_energy: float = 0.0  # TRP: energy rule used for that truncation
    rank_cuts: int = 0  # gradual rank reduction: `cut` is called this many times, evenly over the stage's steps
    regularize: Callable[[nn.Module], None] | None = None  # group_sl: adds its term to the gradients after backward
    optimizer: str = ""  # this stage's optimizer in place of cfg.optimizer (group_sl's sparsity learning: "sgd")


def cut_schedule(epochs: int, steps_per_epoch: int, cuts: int) -> dict[int, float]:
    """{global step (1-based) after which to cut: progress in (0, 1]}: `cuts` cuts evenly spaced over the
    stage, the last after its last step (progress 1, where the budget is reached)."""
    total = epochs * steps_per_epoch
    return {max(1, round(k * total / cuts)): k / cuts for k in range(1, cuts + 1)} if cuts and total else {}


def lr_factor(cfg: RunConfig, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for `epoch` (0-based) of a stage lasting `epochs`."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= round(m * epochs) for m in cfg.milestones)
    return 1.0


def make_optimizer(cfg: RunConfig, model: nn.Module, lr: float, kind: str = "") -> torch.optim.Optimizer:
    """`kind` ("sgd" | "adam"; default cfg.optimizer) over every parameter; SGD with cfg.momentum."""
    if (kind or cfg.optimizer) == "sgd":
        return torch.optim.SGD(model.parameters(), lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, split: Split, cfg: RunConfig,
             cluster: Cluster = Cluster()) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) over `split`, on the model's device; shared out over the cluster."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0.0, 0.0, 0
    for x, y in data.batches(split, cfg.eval_batch_size, max_batches=cfg.max_batches, rank=cluster.rank,
                             world=cluster.world):
        x, y = _on(device, cfg, x, y)
        out = model(x)
        correct += (out.argmax(1) == y).sum().item()
        loss += F.cross_entropy(out, y, reduction="sum").item()
        n += len(y)
    correct, loss, n = cluster.sum([correct, loss, n])
    return 100.0 * correct / n, loss / n


def _on(device: torch.device, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Asynchronous only towards the GPU: a copy to the CPU could be read before it has landed.
    asynchronous = device.type == "cuda"
    x = x.to(device, non_blocking=asynchronous)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=asynchronous)


def ranks_at_energy(model: nn.Module, energy: float) -> dict[str, int]:
    """The rank each SVD layer would keep if pruned now at `energy`."""
    return {name: rank_for_energy(tail_energy(layer.s), energy) for name, layer in svd_layers(model)}


def distillation_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over the batch of T²·KL(teacher ‖ student) on logits softened by T (Hinton et al.): T² keeps its
    gradient on the scale of the cross-entropy's whatever T."""
    return temperature ** 2 * F.kl_div(F.log_softmax(student.float() / temperature, 1),
                                       F.log_softmax(teacher.float() / temperature, 1),
                                       log_target=True, reduction="sum")


def _regularizer(svd: bool, weight: float, fn, *args) -> torch.Tensor:
    """The regularizer's value; without autograd when its weight is 0 (logged, not trained on)."""
    if not svd:
        return torch.zeros(())
    if weight:
        return fn(*args)
    with torch.no_grad():
        return fn(*args)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return iterable


def _tensorboard(folder: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(folder / "tb"), purge_step=purge_step)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch_*.pt"))


def fit(model: nn.Module, data: Dataset, cfg: RunConfig, stage: StageSettings, folder: Path,
        echo=print, cluster: Cluster = Cluster(), cut=None, teacher: nn.Module | None = None) -> list[dict]:
    """Train `model` for one stage, checkpointing every epoch into `folder`; resumes from the latest checkpoint.

    With `stage.rank_cuts`, `cut(model, progress)` is called after the steps `cut_schedule` names; it
    prunes in place and returns whether the ranks or channels changed (then the optimizer is rebuilt: new
    parameters).
    With a `teacher` (frozen, on the device), the task loss is (1 − cfg.distill)·cross-entropy +
    cfg.distill·distillation to the teacher's logits.

    Under torchrun every process calls this with the same model; DistributedDataParallel averages the
    gradients, so the processes stay identical, and only rank 0 writes. Returns the per-epoch history
    (also written to folder/log.csv and TensorBoard).
    """
    def newest_readable_checkpoint() -> Path | None:
        folder.mkdir(parents=True, exist_ok=True)
        for path in reversed(_checkpoints(folder)):
            try:
                load_weights(path)
                return path
            except CheckpointError as e:
                older = path != _checkpoints(folder)[0]
                echo(f"warning: {e}; " + ("using the checkpoint before it" if older else
                                          "no checkpoint before it: the stage starts from its beginning"))
        return None

    history, start, saved = [], 0, None
    path = cluster.on_main(newest_readable_checkpoint)  # rank 0 decides, so every process resumes alike
    if path is not None:
        saved = load_weights(path)
        resize_to_state_(model, saved["model"])  # channels cut earlier in the stage (gradual filter pruning)
        load_into(model, saved["model"], f"checkpoint {path}")
        history, start = saved["history"], saved["epoch"]
        echo(f"[{stage.name}] resuming after epoch {start}")
    model.to(cluster.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model, stage.lr, stage.optimizer)  # after loading: parameters are new objects
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])

    if cfg.sync_bn:
        cluster.sync_batch_norm_(model)  # before DDP wraps it

    def wrapped():
        forward = cluster.wrap(model)
        return torch.compile(forward) if cfg.compile else forward

    forward = wrapped()
    writer = _tensorboard(folder, start + 1) if cluster.main else None
    svd = bool(svd_layers(model))
    dense_targets = trp_layers(model, svdtrain.SVDConfig(exclude_modules=cfg.exclude_modules)) \
        if stage.nuclear or stage.truncate_every else []
    train = data.train
    steps = math.ceil(len(train) / cfg.batch_size)
    steps = min(steps, cfg.max_batches) if cfg.max_batches else steps
    cuts = cut_schedule(stage.epochs, steps, stage.rank_cuts)
    weight = cfg.distill if teacher is not None else 0.0  # of the distillation term against the cross-entropy
    groups = None  # the channel groups, traced at the first step and again after each cut
    for epoch in range(start, stage.epochs):
        lr = stage.lr * lr_factor(cfg, epoch, stage.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + STAGE_SEEDS[stage.name] * 10_007 + epoch)
        model.train()
        # This process's sums over the epoch (task loss, correct, regularizers × images, distillation, images),
        # kept on the device so that a step does not wait for them; added over the processes at the epoch's end.
        sums = torch.zeros(8, dtype=torch.float64, device=cluster.device)
        skipped = 0
        started = time.perf_counter()
        batches = data.batches(train, cfg.batch_size, generator, augment=cfg.augment, max_batches=cfg.max_batches,
                               rank=cluster.rank, world=cluster.world)
        for step, (x, y) in enumerate(_progress(batches, steps, f"{stage.name} {epoch + 1}/{stage.epochs}",
                                                cfg.progress and cluster.main)):
            x, y = _on(cluster.device, cfg, x, y)
            batch = min(cfg.batch_size, len(train) - step * cfg.batch_size)  # images in this step, all processes
            with torch.autocast(cluster.device.type, torch.bfloat16, enabled=cfg.amp == "bf16"):
                out = forward(x)
            # Summed here and divided by the global batch: DDP's mean over processes then gives the
            # gradient of the mean over the whole batch, whatever each process's share.
            task_sum = F.cross_entropy(out.float(), y, reduction="sum")
            distill = torch.zeros(())
            if teacher is not None:
                with torch.no_grad(), torch.autocast(cluster.device.type, torch.bfloat16, enabled=cfg.amp == "bf16"):
                    target = teacher(x)
                distill = distillation_sum(out, target, cfg.distill_temperature)
            fitted = (1 - weight) * task_sum + weight * distill if weight else task_sum
            ortho = _regularizer(svd, stage.lambda_o, svdtrain.orthogonality_loss, model)
            sparse = _regularizer(svd, stage.lambda_s, svdtrain.sparsity_loss, model, cfg.sparsity)
            if stage.lambda_c and groups is None:
                groups = channel_groups(model, x[:1])
            channel = svdtrain.channel_sparsity_loss(model, groups, cfg.sparsity) if stage.lambda_c else \
                torch.zeros(())
            nuclear = nuclear_norm(dense_targets) if stage.nuclear else torch.zeros(())
            loss = fitted * (cluster.world / batch) + stage.lambda_o * ortho + stage.lambda_s * sparse \
                + stage.lambda_c * channel + stage.nuclear * nuclear
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # One wait for the device checks the loss and every gradient. The gradients are the same on
            # every process (DDP averaged them), so all processes stop, or skip, the same steps.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            if not torch.isfinite(loss.detach() + 0 * grad_norm):
                where = (f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} in stage {stage.name}, "
                         f"epoch {epoch + 1}, step {step + 1}")
                if cfg.on_nonfinite == "stop":
                    raise TrainingError(f"{where}; last good checkpoint: {_last_good(folder)} (on_nonfinite=skip "
                                        "skips such steps instead)")
                skipped += 1
                continue
            if stage.regularize is not None:
                stage.regularize(model)
            opt.step()
            if stage.truncate_every and (step + 1) % stage.truncate_every == 0:
                trp_truncate_(dense_targets, stage.truncate_energy)
            progress = cuts.get(epoch * steps + step + 1)
            if progress is not None and cut(model, progress):
                # The optimizer's state belonged to the cut factors or channels; the pruned ones start afresh at
                # this epoch's lr.
                opt = make_optimizer(cfg, model, lr, stage.optimizer)
                forward, groups = wrapped(), None
            with torch.no_grad():
                values = (task_sum, (out.argmax(1) == y).sum(), ortho * len(y), sparse * len(y), channel * len(y),
                          nuclear * len(y), distill)
                sums += torch.stack([v.to(sums) for v in values] + [sums.new_tensor(len(y))])
        # waits for the device
        task, correct, ortho, sparse, channel, nuclear, distill, seen = cluster.sum(sums.tolist())
        if seen == 0:
            raise TrainingError(f"every step of stage {stage.name}, epoch {epoch + 1} had a non-finite loss or "
                                f"gradient; last good checkpoint: {_last_good(folder)}")
        train_seconds = time.perf_counter() - started
        cluster.sync_buffers(model)  # every process evaluates (and rank 0 saves) the same batch-norm statistics
        test_acc, test_loss = evaluate(model, data, data.test, cfg, cluster)
        seconds = time.perf_counter() - started
        means = {"task_loss": task / seen, "orthogonality": ortho / seen, "sparsity": sparse / seen,
                 "channel_sparsity": channel / seen, "nuclear": nuclear / seen, "distillation": distill / seen}
        loss = (1 - weight) * means["task_loss"] + weight * means["distillation"] \
            + stage.lambda_o * means["orthogonality"] + stage.lambda_s * means["sparsity"] \
            + stage.lambda_c * means["channel_sparsity"] + stage.nuclear * means["nuclear"]
        row = {"stage": stage.name, "epoch": epoch + 1, "lr": lr, "loss": loss, **means,
               "train_accuracy": 100.0 * correct / seen, "test_accuracy": test_acc, "test_loss": test_loss,
               "seconds": seconds, "images_per_second": seen / train_seconds, "skipped_steps": skipped}
        notes = [f"{skipped} step(s) skipped (non-finite)"] if skipped else []
        if svd:
            drifts = layer_drifts(model)
            row["orthogonality_drift"] = max(drifts.values())
            row.update({f"rank/{name}": r for name, r in ranks_at_energy(model, cfg.energy).items()})
            drifted = [f"{name} {d:.2f}" for name, d in drifts.items() if d > DRIFT_WARNING]
            if drifted:  # every such layer: a grouped or last layer drifting alone is then told apart
                notes.append(f"U, V of {', '.join(drifted)} drifted from orthonormal (largest |UᵀU − I| or "
                             "|VᵀV − I| entry): s are no longer exactly their singular values")
        history.append(row)
        echo(f"[{stage.name}] epoch {epoch + 1}/{stage.epochs}  loss {row['loss']:.4f}  "
             f"train {row['train_accuracy']:.2f} %  {'val' if data.eval_split == 'validation' else 'test'} "
             f"{test_acc:.2f} %  ({seconds:.0f} s, "
             f"{row['images_per_second']:.0f} images/s)" + "".join(f"\n  warning: {n}" for n in notes))
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"non-finite parameters ({', '.join(bad[:3])}) after stage {stage.name}, epoch "
                                f"{epoch + 1}; not saved; last good checkpoint: {_last_good(folder)}")

        def save_epoch():
            if writer is not None:
                for key, value in row.items():
                    if key not in ("stage", "epoch"):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            save_atomic({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "history": history}, folder / f"epoch_{epoch + 1:03d}.pt")
            for old in _checkpoints(folder)[:-cfg.keep_checkpoints]:
                old.unlink()
            write_csv(folder / "log.csv", history)

        cluster.on_main(save_epoch)  # a failed save (a full disk) stops every process, not only rank 0
    if writer is not None:
        writer.close()
    return history


def _last_good(folder: Path) -> str:
    return str(_checkpoints(folder)[-1]) if _checkpoints(folder) else "none in this stage (it starts from the " \
        "previous stage's final.pt)"


@torch.no_grad()
def layer_drifts(model: nn.Module) -> dict[str, float]:
    """Per SVD layer, the largest entry of |UᵀU − I| or |VᵀV − I| (over its groups): 0 when U and V have
    orthonormal columns, i.e. when s are the singular values of the layer's weight and pruning them is safe."""
    out = {}
    for name, layer in svd_layers(model):
        for factor in (layer.U, layer.V):
            gram = factor.mT @ factor
            eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            out[name] = max(out.get(name, 0.0), (gram - eye).abs().max().item())
    return out


def orthogonality_drift(model: nn.Module) -> tuple[float, str]:
    """The largest of `layer_drifts`, and its layer."""
    return max(((d, name) for name, d in layer_drifts(model).items()), default=(0.0, ""))
