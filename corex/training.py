"""The stage loop of ``train`` and ``pretrain`` stages: restore, epoch, validate, checkpoint.

A ``train`` stage sums its heads' weighted losses; a ``pretrain`` stage hands each batch and the
augmentation to its objective. Either way the loop is the same, and resumable at every epoch end
(and every ``checkpoint_every`` steps): ``last.pt`` holds the model, objective, optimizer,
schedule, loss scaler, EMA, the best epoch so far, every rank's RNG state and the epoch's metrics
row, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from corex import checkpoints, distributed, rundir
from corex.build import build_augment, build_evaluators, build_objective, build_optimizer, build_schedule
from corex.checks import blame, check_augmented, check_batch, check_head_output, check_loss, check_objective_output, culprit_of
from corex.errors import CorexError, RecipeError, RunFailure
from corex.evaluation import data_check, evaluate_loader
from corex.interfaces import EpochEndHook
from corex.loaders import StagePlan, autocast_dtype, check_intensities, stage_plan, to_device
from corex.progress import Progress, log
from corex.rundir import fault_point
from corex.schema import Stage
from corex.seeding import stage_seed
from corex.session import Session

# Training losses are read back from the device (a synchronisation) once per this many steps.
SYNC_EVERY = 10


@attrs.define
class _Loop:
    """What one training stage's epochs share."""

    stage: Stage
    heads: list[str]
    augment: Callable
    objective: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: Any
    dtype: torch.dtype | None
    params: list[nn.Parameter]
    plan: StagePlan
    evaluators: list[tuple[str, Any]]
    val_loader: DataLoader | None
    train_loader: DataLoader
    ema: Any = None  # torch.optim.swa_utils.AveragedModel when the stage asks for it
    forward: nn.Module | None = None  # DistributedDataParallel around the model or objective, when there are several ranks
    best: dict[str, Any] = attrs.field(factory=lambda: {"epoch": None, "value": None, "metrics": {}})
    checked: bool = False
    validated: bool = False
    producers: dict[str, str] = attrs.field(factory=dict)  # validation metric -> the evaluator that computes it


def train_stage(session: Session, stage: Stage) -> dict[str, Any]:
    """A ``train`` (heads) or ``pretrain`` (objective) stage, resumable at epoch boundaries; returns its results.json entry."""
    loop = _prepare(session, stage)
    ckpt_dir = session.out / "checkpoints" / stage.name
    best, start_epoch, resume_at = loop.best, 1, None
    if session.resume and (ckpt_dir / "last.pt").exists():
        best, last_epoch, resume_at = _restore(session, loop, ckpt_dir / "last.pt")
        start_epoch, loop.best = last_epoch + 1, best
        session.eta.steps_done += sum(loop.plan.steps_in(e) for e in range(1, last_epoch + 1)) + (resume_at["step"] if resume_at else 0)
    elif session.resume:
        session.metrics.truncate(session.results["stages"], stage.name, 0)

    fixed_batch = None
    for epoch in range(start_epoch, loop.plan.epochs + 1):
        row, fixed_batch = _train_epoch(session, loop, epoch, fixed_batch, resume_at if epoch == start_epoch else None)
        if loop.val_loader is not None:  # every rank predicts its share, rank 0 scores and decides; the others learn the outcome
            best = loop.best = distributed.broadcast(_validate(session, loop, epoch, row, best, ckpt_dir))
        if loop.objective is not None and isinstance(loop.objective, EpochEndHook) and fixed_batch is not None and session.main:
            (session.out / stage.name).mkdir(parents=True, exist_ok=True)
            loop.objective.eval()
            with torch.no_grad():
                loop.objective.on_epoch_end(epoch=epoch, batch=fixed_batch, out_dir=session.out / stage.name)
        _checkpoint(session, loop, epoch, row, best, ckpt_dir / "last.pt")
        log(_epoch_line(stage, epoch, loop.plan.epochs, row, stage.select.metric) + f"  {session.eta()}")
        if session.main:
            session.hook.corex_epoch_end(run=session.context, stage=stage.name, epoch=epoch, metrics=row)
    return _finish(session, loop, best, ckpt_dir)


def _prepare(session: Session, stage: Stage) -> _Loop:
    """Build what the stage's epochs share, in an order that keeps every random draw where it was."""
    recipe, model, device = session.recipe, session.model, session.device
    pretrain = stage.kind == "pretrain"
    heads = list(stage.heads)
    augment = build_augment(stage, session.registry)
    label_fraction = 1.0 if pretrain else recipe.stage_data(stage).label_fraction
    train_loader = session.loader(stage, "train", shuffle=True, label_fraction=label_fraction)
    # Transfer first: an objective may copy the encoder when built (MoCo's key encoder).
    session.start_encoder(stage)
    objective = build_objective(session.registry, recipe, stage, model.encoder, len(train_loader.dataset)).to(device) if pretrain else None
    evaluators = [] if pretrain else build_evaluators(stage, session.class_names, session.registry)
    model.encoder.requires_grad_(not stage.freeze)
    modules: list[nn.Module] = [model.encoder] + [model.heads[h] for h in heads] + ([objective] if objective is not None else [])
    params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
    if not params:
        raise CorexError(f"stages.{stage.name}: nothing to train (the encoder is frozen and there are no heads)")
    own = stage.optimizer is not None
    optimizer = build_optimizer(params, recipe.stage_optimizer(stage), session.registry, f"stages.{stage.name}.optimizer" if own else "optimizer")
    plan = stage_plan(stage, len(train_loader) if stage.max_steps_per_epoch is None else min(len(train_loader), stage.max_steps_per_epoch))
    schedule = build_schedule(optimizer, recipe.stage_schedule(stage), plan, session.registry,
                              f"stages.{stage.name}.schedule" if stage.schedule is not None else "schedule")
    dtype = autocast_dtype(stage, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    val_loader = None if pretrain else session.loader(stage, "val", shuffle=False, label_fraction=recipe.val_fraction(stage))
    ema = None
    if stage.ema is not None:  # torch's own averaging; batch-norm statistics are averaged too
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(stage.ema), use_buffers=True)
    loop = _Loop(stage, heads, augment, objective, optimizer, schedule, scaler, dtype, params, plan, evaluators, val_loader,
                 train_loader, ema=ema)
    if session.world > 1:  # gradients averaged over the ranks; rank 0's weights and buffers to start
        from torch.nn.parallel import DistributedDataParallel

        target = objective if objective is not None else model
        # Heads of other stages take no part in this one's forward pass: DDP must be told.
        idle = objective is None and any(p.requires_grad for name, head in model.heads.items() if name not in heads for p in head.parameters())
        loop.forward = DistributedDataParallel(target, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=idle)
    return loop


def _finish(session: Session, loop: _Loop, best: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """Keep the best (or averaged) weights, write the stage's model.pt, and say what the stage gave."""
    stage, model = loop.stage, session.model
    distributed.barrier()  # best.pt is written
    if loop.val_loader is not None and best["epoch"] is None:
        metric = stage.select.metric
        seen = [r.get(f"val/{metric}") for r in session.metrics.rows() if r.get("stage") == stage.name]
        raise RunFailure(
            f"stages.{stage.name}.select.metric: '{metric}' was not a finite number at any of the {len(seen)} validations "
            f"(values {', '.join('nan' if v is None else f'{v:g}' for v in seen[:5])}{' ...' if len(seen) > 5 else ''}), so no epoch "
            "could be selected and the stage has no best checkpoint. Select on a metric the validation split can measure "
            f"(e.g. select: loss), or check the evaluator that computes it ({loop.producers.get(metric, 'unknown')}); "
            "metrics.jsonl holds every epoch's values")
    if best["epoch"] is not None:
        session.load_model(ckpt_dir / "best.pt", f"stages.{stage.name}")
    elif loop.ema is not None:
        model.load_state_dict(loop.ema.module.state_dict())
    model.encoder.requires_grad_(True)
    states = session.rng_states()
    if session.main:
        rundir.save_torch(ckpt_dir / "model.pt", {
            "model": model.state_dict(), "arch": model.encoder.arch, "in_channels": model.encoder.in_channels,
            "stage": stage.name, **states,
        })
        fault_point("after_model", stage.name)
    distributed.barrier()
    last_row = next((r for r in reversed(session.metrics.rows()) if r.get("stage") == stage.name), {})
    # From the metrics row, so that a resume after the last epoch still reports the real speed.
    rows = [r for r in session.metrics.rows() if r.get("stage") == stage.name]
    result: dict[str, Any] = {"kind": stage.kind, "epochs": loop.plan.epochs, "steps": int(sum(r.get("steps", 0) for r in rows)),
                              "images_per_s": round(float(last_row.get("images_per_s", 0.0)), 2)}
    if loop.objective is not None:
        result["metrics"] = {k[len("train/"):]: v for k, v in last_row.items() if k.startswith("train/")}
    else:
        result["metrics"] = best["metrics"]
        result["best_epoch"] = best["epoch"]
        result["selected_on"] = stage.select.metric
    return result


def _restore(session: Session, loop: _Loop, path: Path) -> tuple[dict[str, Any], int, Mapping[str, Any] | None]:
    """Everything ``last.pt`` holds, back in place; its metrics row too if the log lost it."""
    stage = loop.stage
    where = f"{session.flags['resume']} (stage '{stage.name}')"
    required = ["model", "optimizer", "schedule", "scaler", "epoch", "best", "rng"] + (["objective"] if loop.objective is not None else []) \
        + (["ema"] if loop.ema is not None else [])
    state = checkpoints.load_checkpoint(path, where, required=required, map_location=session.device)
    checkpoints.load_state(session.model, state["model"], path, where)
    try:
        if loop.objective is not None:
            loop.objective.load_state_dict(state["objective"])
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.schedule.load_state_dict(state["schedule"])
        loop.scaler.load_state_dict(state["scaler"])
        session.set_rng(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CorexError(f"{where}: '{path}' does not fit this stage's objective or optimizer ({str(exc).splitlines()[0][:200]})") from None
    try:
        if loop.ema is not None:
            loop.ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CorexError(f"{where}: '{path}' does not fit this stage's EMA ({str(exc).splitlines()[0][:200]})") from None
    epoch = int(state["epoch"])
    written_by = int(state.get("world_size", 1))
    if written_by != session.world:
        log(f"warning: [{stage.name}] '{path}' was written by {written_by} process(es) and is resumed by {session.world}: "
            "the global batches hold the same samples in the same order, but the random draws (augmentation, dropout) are "
            "not those of the interrupted run")
    if session.main:
        session.metrics.truncate(session.results["stages"], stage.name, epoch)
        row = state.get("row")
        if row and row.get("epoch") == epoch and not session.metrics.has(stage.name, epoch):  # killed between the checkpoint and the log
            session.metrics.append(row)
    distributed.barrier()
    position = state.get("within")  # a checkpoint_every checkpoint inside epoch + 1
    if position:
        log(f"[{stage.name}] resumed in epoch {epoch + 1} after step {position['step']}")
    else:
        log(f"[{stage.name}] resumed after epoch {epoch}")
    return state["best"], epoch, position


def _train_epoch(session: Session, loop: _Loop, epoch: int, fixed_batch: dict | None,
                 resume_at: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict | None]:
    """One epoch; ``resume_at`` (from a mid-epoch checkpoint) holds the step to start after and the
    running sums so far, so the epoch's row equals an uninterrupted one."""
    stage, model, device, recipe = loop.stage, session.model, session.device, session.recipe
    first = int(resume_at["step"]) if resume_at else 0
    steps = loop.plan.steps_in(epoch)
    train_loader = loop.train_loader
    train_loader.sampler.set_epoch(stage_seed(recipe.seed, stage.name, epoch), first * recipe.stage_batch_size(stage))
    model.train()
    if stage.freeze:
        model.encoder.eval()  # a linear probe keeps the encoder's batch-norm statistics
    if loop.objective is not None:
        loop.objective.train()
    sums: dict[str, Tensor] = {k: torch.tensor(v, device=device) for k, v in (resume_at or {}).get("sums", {}).items()}
    seen = int((resume_at or {}).get("seen", 0))
    started = time.perf_counter() - float((resume_at or {}).get("elapsed", 0.0))
    bar = Progress(steps, f"[{stage.name}] epoch {epoch}/{loop.plan.epochs}", note=session.eta,
                   mode="off" if session.quiet or not session.main else None)
    bar.done = first
    for step, batch in enumerate(train_loader, start=first):
        if step >= steps:
            break
        first_step = not loop.checked
        if first_step:
            source = session.source_of(stage)
            check_batch(batch, culprit_of(source, data_path(stage), "dataset"), len(source.class_names), getattr(source, "multilabel", False))
            check_intensities(batch, f"stages.{stage.name}: data '{recipe.stage_data(stage).name}', split 'train'")
            loop.checked = True
        batch = to_device(batch, device, recipe.model.channels_last)
        if loop.objective is not None and fixed_batch is None:
            fixed_batch = _first(batch, 8)
        step_started = time.perf_counter()
        with torch.autocast(device.type, dtype=loop.dtype or torch.float32, enabled=loop.dtype is not None):
            loss, logs = _step_loss(session, loop, batch, first_step)
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        if stage.grad_clip:
            loop.scaler.unscale_(loop.optimizer)
            torch.nn.utils.clip_grad_norm_(loop.params, stage.grad_clip)
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loop.schedule.step()
        if loop.ema is not None:
            loop.ema.update_parameters(model)
        n = batch["image"].shape[0]
        seen += n
        # Summed on the device; read back every SYNC_EVERY steps, not every step (a GPU sync).
        for key, value in {"train/loss": loss, **logs}.items():
            value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
            sums[key] = sums.get(key, 0.0) + value * n
        session.eta.steps_done += 1
        session.eta.seconds += time.perf_counter() - step_started
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            running = float(sums["train/loss"]) / seen
            if not math.isfinite(running):
                raise RunFailure(f"stages.{stage.name}: the loss became {running} by epoch {epoch}, step {step + 1}; lower the learning rate or check the data")
            bar.set_values(loss=running, img_s=seen / (time.perf_counter() - started))
        bar.update(1)
        if stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0 and step + 1 < steps:
            within = {"step": step + 1, "seen": seen, "elapsed": time.perf_counter() - started,
                      "sums": {k: float(v) for k, v in sums.items()}}
            _checkpoint(session, loop, epoch - 1, None, loop.best, session.out / "checkpoints" / stage.name / "last.pt", within=within)
    bar.close()
    if session.world > 1:  # the epoch's means over every rank's samples
        keys = sorted(sums)
        totals = distributed.all_sum(torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float64) for k in keys]
                                                 + [torch.tensor(float(seen), device=device, dtype=torch.float64)]))
        sums, seen = dict(zip(keys, totals[:-1])), int(totals[-1].item())
    elapsed = time.perf_counter() - started
    row: dict[str, Any] = {"stage": stage.name, "epoch": epoch, **{k: float(v) / max(seen, 1) for k, v in sums.items()}}
    row["lr"] = loop.optimizer.param_groups[0]["lr"]
    row["images_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    row["train_time_s"] = elapsed
    row["global_batch"] = recipe.stage_batch_size(stage)
    row["processes"] = session.world
    row["images"] = seen
    row["steps"] = steps
    return row, fixed_batch


def _step_loss(session: Session, loop: _Loop, batch: dict[str, Any], first: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one training step, and the extra scalars to log.

    A pretrain stage hands the batch and the augmentation to its objective (which may make
    several views); a train stage augments once and sums the heads' weighted losses. Either way
    augmentation runs without gradients. On the ``first`` step of a stage every component's output
    is held to its contract (corex.checks); a third-party plugin that raises is named.
    """
    stage, model = loop.stage, session.model
    augment = _augment(loop, first)
    if loop.objective is not None:
        objective = culprit_of(loop.objective, f"stages.{stage.name}.objective", "objective")
        with blame(objective, "computing the pre-training loss"):
            out = (loop.forward or loop.objective)(batch, _without_grad(augment))
        if first:
            check_objective_output(out, objective)
        return out["loss"], {f"train/{k}": v for k, v in out.items() if k != "loss"}
    with torch.no_grad():
        batch = augment(batch)
    heads = list(stage.heads)
    if loop.forward is not None:  # DistributedDataParallel runs the encoder and the heads as one module
        with blame(culprit_of(model.encoder, "model.encoder", "encoder"), "running the encoder and heads"):
            outputs = loop.forward(batch["image"], heads)
    else:  # what CorexModel.forward does, one component at a time so that a failure names its component
        with blame(culprit_of(model.encoder, "model.encoder", "encoder"), "encoding a batch"):
            features = model.encoder(batch["image"])
        outputs = {}
        for h in heads:
            with blame(culprit_of(model.heads[h], f"stages.{stage.name}.heads.{h}", "head"), "computing the head's output"):
                outputs[h] = model.heads[h](features)
    losses = {}
    for h in heads:
        head = culprit_of(model.heads[h], f"stages.{stage.name}.heads.{h}", "head")
        if first:
            check_head_output(outputs[h], getattr(model.heads[h], "task", ""), batch["image"], len(session.class_names), head, loop.dtype)
        with blame(head, "computing the head's loss"):
            losses[h] = model.heads[h].loss(outputs[h], batch)
        if first:
            check_loss(losses[h], head, "loss(output, batch)")
    loss = sum(stage.heads[h].weight * losses[h] for h in heads)
    return loss, ({f"train/loss/{h}": v for h, v in losses.items()} if len(losses) > 1 else {})


def _augment(loop: _Loop, first: bool) -> Callable[[dict], dict]:
    """The stage's augmentation; on the first step, held to its contract and named if it raises."""
    if loop.stage.augment is None:
        return loop.augment
    culprit = culprit_of(loop.augment, f"stages.{loop.stage.name}.augment", "augmentation")

    def run(batch: dict) -> dict:
        with blame(culprit, "augmenting a batch"):
            after = loop.augment(batch)
        if first:
            check_augmented(batch, after, culprit)
        return after

    return run


def _validate(session: Session, loop: _Loop, epoch: int, row: dict[str, Any], best: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    stage = loop.stage
    evaluated = loop.ema.module if loop.ema is not None else session.model
    first = epoch == 1 or not loop.validated
    loop.validated = True
    source = session.source_of(stage)
    val_metrics = evaluate_loader(
        evaluated, loop.val_loader, loop.heads, loop.evaluators, session.device, weights=session.head_weights(stage),
        amp=autocast_dtype(stage, session.device), channels_last=session.recipe.model.channels_last, where=f"stages.{stage.name}",
        desc=session.progress_desc(f"[{stage.name}] validate"),
        check=data_check(source, session.recipe, stage) if first else None, num_classes=len(source.class_names) if first else None,
        producers=loop.producers,
    )[0]
    if not session.main:
        return best
    row.update({f"val/{k}": v for k, v in val_metrics.items()})
    metric = stage.select.metric
    if metric not in val_metrics:
        raise RecipeError([f"stages.{stage.name}.select.metric: '{metric}' is not a validation metric; "
                           f"available: {', '.join(sorted(val_metrics))}"])
    value = val_metrics[metric]
    better = best["value"] is None or (value > best["value"] if stage.select.maximize else value < best["value"])
    if better and math.isfinite(value):
        best = {"epoch": epoch, "value": value, "metrics": val_metrics}
        rundir.save_torch(ckpt_dir / "best.pt", {"model": evaluated.state_dict(), "epoch": epoch, metric: value, "arch": session.model.encoder.arch})
    return best


def _checkpoint(session: Session, loop: _Loop, epoch: int, row: dict[str, Any] | None, best: dict[str, Any], path: Path,
                within: Mapping[str, Any] | None = None) -> None:
    """``last.pt`` holds the epoch's metrics row as well, so the two are written as one step:
    a kill between them is repaired on resume. ``within`` marks a checkpoint inside epoch
    ``epoch + 1`` (``checkpoint_every``): its step and running sums. Every rank's RNG state is
    in it; rank 0 writes it."""
    states = session.rng_states()
    if session.main:
        rundir.save_torch(path, {
            "within": dict(within) if within else None,
            "ema": loop.ema.state_dict() if loop.ema is not None else None,
            "model": session.model.state_dict(),
            "objective": loop.objective.state_dict() if loop.objective is not None else None,
            "optimizer": loop.optimizer.state_dict(),
            "schedule": loop.schedule.state_dict(),
            "scaler": loop.scaler.state_dict(),
            "epoch": epoch,
            "best": best,
            "arch": session.model.encoder.arch,
            "row": row,
            **states,
        })
        if within:
            fault_point("after_step_checkpoint", loop.stage.name, f"{epoch + 1}:{within['step']}")
        else:
            fault_point("after_checkpoint", loop.stage.name, epoch)
            session.metrics.append(row)
            fault_point("after_row", loop.stage.name, epoch)
    distributed.barrier()


def _first(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a batch (tensors, lists and mappings of them, such as ``meta``)."""
    return {k: _first(v, n) if isinstance(v, Mapping) else v[:n] if isinstance(v, (Tensor, list)) else v for k, v in batch.items()}


def data_path(stage: Stage) -> str:
    """The recipe key of the data a stage reads."""
    return f"stages.{stage.name}.data" if stage.data is not None else "data"


def _without_grad(augment: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def run(batch: dict) -> dict:
        with torch.no_grad():
            return augment(batch)

    return run


def _epoch_line(stage: Stage, epoch: int, epochs: int, row: Mapping[str, Any], select: str) -> str:
    parts = [f"[{stage.name}] epoch {epoch}/{epochs}", f"loss {row.get('train/loss', float('nan')):.4f}"]
    if "val/loss" in row:
        parts.append(f"val loss {row['val/loss']:.4f}")
    if select != "loss" and f"val/{select}" in row:
        parts.append(f"val {select} {row[f'val/{select}']:.4f}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    return "  ".join(parts)


__all__ = ["train_stage"]
