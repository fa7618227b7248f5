"""The one training loop: claim the output, prepare data, accelerate, steps with logging and
checkpoints, save the model, commit the folder (all or nothing; resumable)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.outputs import (
    claim_output,
    commit_output_dir,
    discard_output_dir,
    holds_output,
    partial_path,
    prepare_output_dir,
    release_output,
    write_json,
)
from erasekit.progress import Progress
from erasekit.progress import bar as progress_bar
from erasekit.training.checkpoints import (
    config_fingerprint,
    find_resume,
    list_checkpoints,
    register_unet_hooks,
    save_checkpoint,
    truncate_log,
)
from erasekit.training.config import (
    CHECKPOINTS,
    STATE_FILE,
    TRAINING_LOG,
    WEIGHT_DTYPES,
    TrainConfig,
)
from erasekit.training.data import encode_prompts
from erasekit.training.job import (
    NonFiniteLoss,
    TrainContext,
    TrainingJob,
    compile_unet,
    make_optimizer,
)


def train(job: TrainingJob, pipe, *, out_dir: str | Path, **kwargs: Any) -> Path:
    """Run ``job`` on ``pipe`` and write its output folder ``out_dir`` (all or nothing).

    Work happens in ``out_dir``'s hidden ``.partial`` sibling, which also holds the checkpoints,
    so ``resume="latest"`` (or a checkpoint path) continues an interrupted run. A run that fails
    before its first checkpoint leaves nothing behind. The main process holds the output's lock
    (``erasekit.outputs.claim_output``) for the whole run. Keyword arguments: see ``_train``.
    """
    from erasekit.distributed import process_state
    from erasekit.models import is_sdxl

    if is_sdxl(pipe) and not job.runs_on_sdxl:
        raise ErasekitError(f"{job.name} does not run on SDXL yet (its U-Net calls lack SDXL's "
                            "added time/text conditioning); on SDXL: --method uce")  # fmt: skip
    if job.double_backward and job.config.compile != "no":
        raise ErasekitError(f"compile={job.config.compile}: {job.name} differentiates through "
                            "its gradients, which torch.compile does not support; use "
                            "compile=no")  # fmt: skip
    main = process_state(str(pipe.device)).is_main_process
    try:
        return _train(job, pipe, out_dir=out_dir, **kwargs)
    except BaseException:
        work_dir = partial_path(out_dir)
        if main and holds_output(out_dir) and not list_checkpoints(work_dir):
            discard_output_dir(work_dir)
        raise
    finally:
        if main:
            release_output(out_dir)


def _train(
    job: TrainingJob,
    pipe,
    *,
    model_path: str | Path,
    out_dir: str | Path,
    concept=None,
    resume: str | None = None,
    overwrite: bool = False,
    progress: Progress = True,
) -> Path:
    """The loop's phases, top to bottom."""
    started = time.time()
    out_dir = Path(out_dir)
    work_dir = partial_path(out_dir)
    fingerprint = config_fingerprint(job.name, job.config)
    resume_from = _negotiate_output(out_dir, work_dir, str(pipe.device), resume, overwrite,
                                    fingerprint, job.config)  # fmt: skip
    # Data first: encoded once by the frozen VAE and text encoder (a job may also run trainings
    # of its own here, e.g. NegMerge's fine-tuned copies, each with its own accelerator).
    data = job.prepare_data(pipe)
    accelerator = _make_accelerator(job.config, str(pipe.device))
    module, trainable = _freeze(job, pipe, accelerator)
    ctx = _prepare(job, pipe, accelerator, data, module, trainable, work_dir)
    if resume_from:
        _resume(ctx, resume_from)
    job.on_train_start(ctx)
    total = _run_steps(job, ctx, fingerprint, progress)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save(job, ctx, model_path, concept, total, resume_from, started)
        if not job.config.keep_checkpoints:
            shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
        commit_output_dir(work_dir, out_dir)
    accelerator.wait_for_everyone()
    # not accelerator.end_training(): it destroys the process group, and one audit trains
    # several times (its attacks); the CLI closes the group on exit
    return out_dir


def _negotiate_output(
    out_dir: Path, work_dir: Path, device: str, resume: str | None, overwrite: bool,
    fingerprint: str, config: TrainConfig,
) -> str | None:  # fmt: skip
    """Claim the output folder (or find the checkpoint to resume) on the main process; every
    process gets the same answer or the same error."""
    from erasekit.distributed import process_state

    state = process_state(device)
    resume_from, error = None, None
    if state.is_main_process:
        try:
            if resume:
                claim_output(out_dir)
                resume_from = find_resume(work_dir, resume, fingerprint, config)
                if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
                    raise ErasekitError(f"output folder is not empty: {out_dir}")
            else:
                _refuse_to_drop_checkpoints(out_dir, work_dir, overwrite)
                prepare_output_dir(out_dir, overwrite)
        except ErasekitError as e:
            error = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error, resume_from = broadcast_object_list([error, resume_from])
    if error:
        raise ErasekitError(error)
    return resume_from


def _refuse_to_drop_checkpoints(out_dir: Path, work_dir: Path, overwrite: bool) -> None:
    """A new run over an interrupted run's checkpoints would delete them: without
    ``overwrite``, stop and say how to continue it instead."""
    claim_output(out_dir)  # a live run's work is refused by the lock, not here
    found = list_checkpoints(work_dir)
    if found and not overwrite:
        release_output(out_dir)
        raise ErasekitError(f"{work_dir} holds an interrupted run's checkpoints (newest:"
                            f" {found[-1].name}); continue it with --resume latest, or pass"
                            " --overwrite to discard them")  # fmt: skip


def _make_accelerator(config: TrainConfig, device: str):
    """A fresh Accelerator for this run (several trainings in one process may differ in
    precision: the accelerator state is per run, the process group is kept), seeded."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=device.startswith("cpu"),
        )
    except (ValueError, RuntimeError) as e:
        raise ErasekitError(f"mixed_precision={config.mixed_precision}: {e}") from None
    set_seed(config.seed)
    return accelerator


def _freeze(job: TrainingJob, pipe, accelerator) -> tuple[torch.nn.Module, dict]:
    """Everything frozen but the job's trainable parameters; frozen encoders leave the GPU
    unless the job runs the text encoder itself. Returns (trained module, name -> parameter)."""
    if accelerator.device.type == "cuda":
        pipe.vae.to("cpu")
        if not job.uses_text_encoder:
            pipe.text_encoder.to("cpu")
    unet = pipe.unet
    unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    module = job.trained_module(pipe)
    trainable = dict(job.trainable_parameters(module))
    if not trainable:
        raise ErasekitError(f"{job.name}: no parameter is selected for training")
    for p in trainable.values():
        p.requires_grad_(True)
    if job.config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(module is unet)
    module.train()
    return module, trainable


def _prepare(job, pipe, accelerator, data, module, trainable, work_dir: Path) -> TrainContext:
    """The job's setup on the raw U-Net, then optimizer, LR schedule and ``prepare``."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    config = job.config
    ctx = TrainContext(
        accelerator=accelerator,
        unet=pipe.unet,
        pipe=pipe,
        config=config,
        data=data,
        empty_cond=encode_prompts(pipe, [""]).to(accelerator.device),
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        weight_dtype=WEIGHT_DTYPES[config.mixed_precision],
        device=accelerator.device,
        work_dir=work_dir,
    )
    pipe.unet.to(accelerator.device)
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    module.to(accelerator.device)
    job.setup(ctx)  # frozen teachers, masks: before prepare, on the raw U-Net
    compile_unet(pipe.unet, config)
    ctx.total = job.total_steps(data)
    lr = job.learning_rate(accelerator.num_processes)
    optimizer = make_optimizer(config, job.parameter_groups(trainable), lr)
    ctx.lr_schedule = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                    num_warmup_steps=config.lr_warmup_steps,
                                    num_training_steps=max(1, ctx.total))  # fmt: skip
    register_unet_hooks(accelerator)
    ctx.trained, ctx.optimizer = accelerator.prepare(module, optimizer)
    if module is pipe.unet:
        ctx.unet = ctx.trained
    accelerator.register_for_checkpointing(ctx.lr_schedule)
    return ctx


def _resume(ctx: TrainContext, checkpoint: str) -> None:
    ctx.accelerator.load_state(checkpoint)
    ctx.step = json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"]
    if ctx.accelerator.is_main_process:
        truncate_log(ctx.work_dir / TRAINING_LOG, ctx.step)


def _run_steps(job, ctx: TrainContext, fingerprint: str, progress) -> int:
    """Optimizer steps until the job's total, one log line each, checkpoints on schedule."""

    accelerator, config = ctx.accelerator, ctx.config
    found = list_checkpoints(ctx.work_dir)
    last_good = str(found[-1]) if found else None
    bar = progress_bar(progress, total=ctx.total, initial=ctx.step, desc=job.name, unit="step",
                       main=accelerator.is_main_process)  # fmt: skip
    t_last = time.time()
    while ctx.step < ctx.total:
        try:
            record = _step(job, ctx)
        except NonFiniteLoss as e:
            bar.close()
            hint = ""
            if last_good:
                hint = (f"; the last good checkpoint ({last_good}) resumes only with the same"
                        " settings, so start a new run with a lower lr (--set lr=...)")  # fmt: skip
            raise NonFiniteLoss(f"{e}{hint}") from None
        record["seconds"] = round(time.time() - t_last, 4)
        t_last = time.time()
        if accelerator.is_main_process:
            with open(ctx.work_dir / TRAINING_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        bar.update(1)
        job.on_step_end(ctx)
        every = config.checkpointing_steps
        if every and ctx.step % every == 0 and ctx.step < ctx.total:
            last_good = str(save_checkpoint(accelerator, ctx.work_dir, ctx.step, fingerprint,
                                             config))  # fmt: skip
    bar.close()
    return ctx.total


def _average_gradients(ctx: TrainContext) -> None:
    """Mean of every trained parameter's gradient over the processes (a parameter a process
    left without one counts as zero there), for jobs that write their gradients themselves."""
    for group in ctx.optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = ctx.accelerator.reduce(grad.contiguous(), reduction="mean")


def _step(job, ctx: TrainContext) -> dict[str, Any]:
    """One optimizer step over the accumulation micro-steps; its log record. The logged loss
    (and every numeric statistic) is the mean over micro-steps and processes."""
    accelerator, config = ctx.accelerator, ctx.config
    n_micro = config.gradient_accumulation_steps
    losses: list[float] = []
    extra: dict[str, Any] = {}
    grad_norm = None
    for micro in range(n_micro):
        with accelerator.accumulate(ctx.trained):
            loss, logs = job.loss(ctx, micro)
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=ctx.device)
            if accelerator.gather(bad).sum() > 0:
                raise NonFiniteLoss(f"{job.name}: loss became {loss.item()} at step "
                                    f"{ctx.step + 1} (lower lr or check the data)")  # fmt: skip
            if not job.sets_gradients:
                accelerator.backward(loss)
            elif accelerator.num_processes > 1 and accelerator.sync_gradients:
                _average_gradients(ctx)  # no backward pass, so no DDP all-reduce: do it here
            job.after_backward(ctx.trained)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                norms = [accelerator.clip_grad_norm_(g["params"], config.max_grad_norm)
                         for g in ctx.optimizer.param_groups]  # fmt: skip
                grad_norm = norms[0]
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        for k, v in logs.items():
            if isinstance(v, (int, float)):
                extra[k] = extra.get(k, 0.0) + float(v) / n_micro
            else:  # e.g. the names of sampled configurations: kept as given
                extra[k] = v
    ctx.lr_schedule.step()
    ctx.step += 1
    loss_value = sum(losses) / len(losses)
    if accelerator.num_processes > 1:  # every process's share, not the main one's alone
        numeric = sorted(k for k, v in extra.items() if isinstance(v, float))
        values = torch.tensor([loss_value, *[extra[k] for k in numeric]], dtype=torch.float64,
                              device=ctx.device)  # fmt: skip
        values = accelerator.reduce(values, reduction="mean").tolist()
        loss_value = values[0]
        extra.update(zip(numeric, values[1:], strict=True))
    return {
        "step": ctx.step,
        "loss": loss_value,
        **extra,
        "lr": ctx.lr_schedule.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
    }


def _save(job, ctx: TrainContext, model_path, concept, total: int, resume_from, started) -> None:
    """Main process: the final model (unless the job saves none), its outputs and manifest."""
    from erasekit.models import MANIFEST, build_manifest, write_model

    accelerator, config, pipe = ctx.accelerator, ctx.config, ctx.pipe
    if job.saves_model:
        final = job.finalize_unet(accelerator.unwrap_model(ctx.unet))
        final.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            final.disable_gradient_checkpointing()
        if config.save_dtype != "fp32":
            final = final.to(WEIGHT_DTYPES[config.save_dtype])
        pipe.unet = final
        pipe.vae.to(accelerator.device)
        pipe.text_encoder.to(accelerator.device)
    outputs = job.write_outputs(ctx.work_dir)
    manifest = build_manifest(
        base_model=model_path,
        method=job.name,
        config=asdict(config),
        concept=concept.describe() if concept is not None else None,
        seeds=[config.seed],
        started=started,
        extra={
            "training": {
                "steps": total,
                "resumed_from": Path(resume_from).name if resume_from else None,
                "n_processes": accelerator.num_processes,
                "global_batch": config.batch_size * accelerator.num_processes
                * config.gradient_accumulation_steps,
                "data": job.describe_data(),
                "log": TRAINING_LOG if (ctx.work_dir / TRAINING_LOG).is_file() else None,
                "outputs": outputs,
            },
        },
    )  # fmt: skip
    if job.saves_model:
        write_model(pipe, ctx.work_dir, manifest)
    else:
        write_json(ctx.work_dir / MANIFEST, manifest)
