"""The staged pipeline of METHOD.md §4: train → sparsify → prune → finetune → export → report.

Each stage reads what the previous one left in the run folder and writes `<stage>/result.json` last, so a stage
with a result.json is done; `resume` skips done stages and continues an interrupted one from its last epoch
checkpoint. Each stage is built aside and swapped in when it has finished (folder.py): a failed command changes
nothing in the run folder.
"""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path

import torch
from torch import nn

import svdtrain
from svdtrain.export import TIE, export_decisions
from svdtrain.latency import threads
from svdtrain.layers import svd_layers

from .baselines import FILTER_METHODS, group_sparsity_pruner, input_covariances, normalize_v_, one_shot, whiten_
from .config import RunConfig
from .cuts import channels_removed, merged
from .files import save_atomic, write_atomic
from .folder import STAGES, swap_in
from .report import write_report
from .run import Run

SPEED_CORRECTIONS = 2  # further cuts the prune stage makes while the measured speed-up falls short of the target


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Each SVD layer's |s|, sorted descending (all groups together)."""
    return {name: layer.s.detach().abs().flatten().sort(descending=True).values.tolist()
            for name, layer in svd_layers(model)}


# --- the stages --------------------------------------------------------------------------------------------------

def stage_train(run: Run) -> dict:
    """Dense training, or SVD form from scratch with orthogonality only; or start from a dense checkpoint."""
    cfg = run.cfg
    model = run.starting_model()
    form = "svd" if cfg.train_mode == "svd" else "dense"
    if form == "svd":
        run.decompose(model, init="svd" if cfg.dense_checkpoint else "random")
    started = time.perf_counter()
    accuracy = run.fit(model, "train", cfg.train_epochs, cfg.lr, cfg.lambda_o if form == "svd" else 0.0, 0.0)
    result = {"form": form, "accuracy": accuracy, "seconds": time.perf_counter() - started}
    run.finish("train", result, model)
    return result


def stage_sparsify(run: Run) -> dict:
    """svd: convert to SVD form (exact SVD) if dense, then train with orthogonality + sparsity.
    trp: dense training with periodic SVD truncation and the nuclear norm. group_sl, and filter_pruning with
    prune_cuts: see `_sparsify_filters`. Other methods: nothing to do."""
    cfg = run.cfg
    model = run.model_after("train")
    started = time.perf_counter()
    if cfg.method == "svd":
        if not svd_layers(model):
            run.decompose(model, init="svd")
        run.write_in("sparsify", "spectra_before.json", json.dumps(spectra(model)))
        accuracy = run.fit(model, "sparsify", cfg.sparsify_epochs, cfg.lr, cfg.lambda_o, cfg.lambda_s,
                           cut=run.gradual_cut, rank_cuts=cfg.prune_cuts,
                           lambda_c=cfg.lambda_c if cfg.prune_channels else 0.0)
        run.write_in("sparsify", "spectra_after.json", json.dumps(spectra(model)))
    elif cfg.method == "trp":
        accuracy = run.fit(model, "sparsify", cfg.sparsify_epochs, cfg.lr, 0.0, 0.0, nuclear=cfg.trp_nuclear,
                           truncate_every=cfg.trp_period, truncate_energy=cfg.trp_energy)
    elif cfg.method in FILTER_METHODS and not one_shot(cfg.method, cfg.prune_cuts):
        accuracy = _sparsify_filters(run, model)
    else:
        accuracy = run.result("train")["accuracy"]
    if run.cuts:
        run.write_in("sparsify", "cuts.json", json.dumps(run.cuts, indent=1) + "\n")
    form = "svd" if svd_layers(model) else "dense"
    result = {"form": form, "accuracy": accuracy, "seconds": time.perf_counter() - started}
    run.finish("sparsify", result, model)
    return result


def _sparsify_filters(run: Run, model: nn.Module) -> float:
    """The filter prunings' sparsify stage: group_sl's sparsity learning (SGD with momentum at group_sl_lr, its
    regularizer on the gradients before each step, as DepGraph's is published), and with prune_cuts the channels
    cut toward the budget on the cubic schedule (filter_pruning: plain training at lr meanwhile)."""
    cfg = run.cfg
    dense = copy.deepcopy(model).cpu().eval()  # the budget's reference: the train stage's model
    learner = {}

    def regularize(m: nn.Module):
        if "pruner" not in learner:  # built on the model as it is now: a cut replaces the layers it spans
            training = m.training
            m.eval()  # the trace runs a forward pass, which must not move the batch-norm statistics
            example = run.example_input().to(next(m.parameters()).device)
            learner["pruner"] = group_sparsity_pruner(m, example, run.excluded(m), cfg.group_sl_reg)
            m.train(training)
        learner["pruner"].regularize(m)

    def cut(m: nn.Module, progress: float) -> bool:
        changed = run.gradual_channel_cut(m, progress, dense)
        if changed:
            learner.clear()
        return changed

    if cfg.method == "group_sl":
        settings = {"regularize": regularize, **({"optimizer": "sgd"} if cfg.group_sl_lr else {})}
        lr = cfg.group_sl_lr or cfg.lr
    else:
        settings, lr = {}, cfg.lr
    return run.fit(model, "sparsify", cfg.sparsify_epochs, lr, 0.0, 0.0, cut=cut, rank_cuts=cfg.prune_cuts,
                   **settings)


def stage_prune(run: Run) -> dict:
    """Prune singular values by energy or to a FLOPs / parameter budget; filter_pruning prunes channels instead."""
    cfg = run.cfg
    model = run.model_after("sparsify")
    example = run.example_input()
    if cfg.method in FILTER_METHODS:
        # After gradual cuts the model may meet the budget already (then nothing is cut) or fall short of it by
        # what the last cut's timing missed: measured against the dense model, it is cut to the budget.
        dense = run.model_after("train").eval()
        dense_flops = svdtrain.count_flops(dense, example)
        pruned = run.filter_prune(model, reference=dense)
        run.echo(f"filter pruning: {channels_removed(pruned)}"
                 + (" (the gradual cuts during sparsify reached the budget)" if cfg.prune_cuts and not pruned["cut"]
                    else "")
                 + (f"; {run.speed_line(pruned)}" if cfg.target_speedup else ""))
        result = {"form": "dense", **_recalibrated(run, model), **pruned,
                  "flops": svdtrain.count_flops(model, example), "dense_flops": dense_flops}
        run.finish("prune", result, model)
        return result
    if not svd_layers(model):
        run.decompose(model, init="svd")
    if cfg.method == "whitened_svd":
        whitened = whiten_(model, input_covariances(model, run.calibration_batches(model, cfg.whiten_images)))
        run.echo(f"whitened SVD: {len(whitened)} of {len(svd_layers(model))} layers, by the input covariance over "
                 f"{cfg.whiten_images} training images")
    speed = {}
    if cfg.target_speedup and cfg.prune_cuts:
        # The gradual cuts aimed at the target by predicted latency; measured, the model may already meet it, and a
        # cut for the prediction's last per cent can cost many points of accuracy: measure before cutting.
        speed = run.measured_speedup(model)
        run.echo(run.speed_line(speed))
    def meets(speed: dict) -> bool:
        return bool(speed) and speed["speedup"] * TIE >= cfg.target_speedup

    report = run.prune(model, 1.0 if meets(speed) else None)  # a budget of the dense latency: the report, nothing cut
    if cfg.target_speedup:
        # The ranks were chosen by predicted latency; the whole model, measured, may fall short of it (timing
        # noise, work a lone layer does not show): cut further, by the measured shortfall, a few times at most.
        for attempt in range(SPEED_CORRECTIONS + 1):
            if not speed or report.cut:  # not measured yet, or cut since
                speed = run.measured_speedup(model)
                run.echo(run.speed_line(speed))
            if meets(speed) or attempt == SPEED_CORRECTIONS:
                break
            aim = report.latency_after_ms / report.dense_latency_ms * speed["speedup"] / cfg.target_speedup
            further = run.prune(model, aim)
            if not further.cut:
                run.echo("  short of the target, and no lower rank is predicted faster: this is the fastest export "
                         "of these layers on the deployment")
                break
            run.echo(f"  short of the target: cut to {aim:.3f} of the dense latency (predicted)")
            report = merged(report, further)
    run.echo(str(report))
    if cfg.method == "whitened_svd":
        normalize_v_(model, whitened)  # fine-tuning's scale (see normalize_v_); the same function
    if cfg.prune_cuts and not report.cut:
        run.echo("nothing left to cut: the gradual cuts during sparsify reached the budget")
    run.write_in("prune", "prune_report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    result = {"form": "svd", **_recalibrated(run, model), "energy": report.energy,
              "flops": report.flops_after, "dense_flops": report.dense_flops, **speed}
    run.finish("prune", result, model)
    return result


def _recalibrated(run: Run, model: nn.Module) -> dict:
    """Accuracy of the pruned model, and after batch-norm recalibration when the run asks for it."""
    out = {"accuracy": run.accuracy(model)}
    if run.recalibrate_bn(model):
        out["accuracy_before_bn_recalibration"], out["accuracy"] = out["accuracy"], run.accuracy(model)
        run.echo(f"batch-norm statistics re-estimated on {run.cfg.bn_recalibrate} training images: accuracy "
                 f"{out['accuracy_before_bn_recalibration']:.2f} % -> {out['accuracy']:.2f} %")
    return out


def stage_finetune(run: Run) -> dict:
    """Fine-tune the pruned model: svd with orthogonality only; baselines without regularizers. Methods that
    have no sparsify phase (truncated_svd, whitened_svd, filter_pruning with prune_cuts=0) fine-tune for
    sparsify_epochs + finetune_epochs, so every method gets the same number of epochs after the dense model."""
    cfg = run.cfg
    model = run.model_after("prune")
    epochs = cfg.finetune_epochs + (cfg.sparsify_epochs if one_shot(cfg.method, cfg.prune_cuts) else 0)
    started = time.perf_counter()
    accuracy = run.fit(model, "finetune", epochs, cfg.finetune_lr, cfg.lambda_o if cfg.method == "svd" else 0.0, 0.0)
    result = {"form": "svd" if svd_layers(model) else "dense", "accuracy": accuracy,
              "seconds": time.perf_counter() - started}
    run.finish("finetune", result, model)
    return result


def stage_export(run: Run) -> dict:
    """The plain model as model.pt (state_dict) + layout.json (rebuild with `load_exported`: no code is unpickled),
    model.pt2 (torch.export) and model.onnx; forms chosen by export_strategy on export_backend (at export_batch,
    export_threads)."""
    cfg = run.cfg
    model = run.model_after("finetune")
    example = run.example_input()
    with threads(cfg.export_threads):
        small, decisions = export_decisions(model, run.example_input(cfg.export_batch), cfg.export_strategy,
                                            cfg.export_backend)
        small.eval()
    for line in dense_reasons(decisions, cfg):
        run.echo(line)
    folder = run.stage_dir("export")
    layers = [{"name": name, "rank": layer.rank, "full_rank": layer.full_rank,
               "decomposition": getattr(layer, "decomposition", "channel"),
               "form": "thin" if isinstance(small.get_submodule(name), nn.Sequential) else "dense",
               "why": decisions["layers"][name]["why"]}
              for name, layer in svd_layers(model)]
    layout = {"model": cfg.model, "kind": "svd" if layers else "dense", "strategy": cfg.export_strategy,
              "backend": cfg.export_backend, "batch": cfg.export_batch, "threads": cfg.export_threads,
              "layers": layers}
    write_atomic(folder / "layout.json", json.dumps(layout, indent=2) + "\n")
    save_atomic(small.state_dict(), folder / "model.pt")
    program = torch.export.export(small, (example,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_atomic(folder / "model.pt2", buffer.getvalue())
    onnx = _export_onnx(small, example, folder / "model.onnx") if cfg.onnx else "disabled (onnx=false)"
    result = {"form": "exported", "accuracy": run.accuracy(small), "flops": svdtrain.count_flops(small, example),
              "params": svdtrain.count_params(small), "onnx": onnx, "layers": layers}
    run.finish("export", result)
    return result


def dense_reasons(decisions: dict, cfg: RunConfig) -> list[str]:
    """What `export_decisions` kept dense on the deployment and why (measured times), and what would pay there; no
    line when every layer is thin."""
    if cfg.export_strategy != "latency":
        return []
    where = f"{cfg.export_backend} at batch {cfg.export_batch}"
    layers, whole = decisions["layers"], decisions["whole"]
    dense = {name: e for name, e in layers.items() if e["form"] == "dense"}
    lines = []
    if dense:
        why = [f"{name} (rank {e['rank']}: thin pair measured no faster, dense {e['dense_ms']:.3f} ms, thin "
               f"{e['thin_ms']:.3f} ms; " + (f"it pays at rank ≤ {e['thin_pays_at_rank']})"
                                             if e.get("thin_pays_at_rank") else "no lower rank pays)")
               if "dense_ms" in e else f"{name} ({e['why']})" for name, e in dense.items()]
        lines.append(f"export: {len(dense)} of {len(layers)} layers stay dense on {where}: " + "; ".join(why))
    if whole is not None and not whole["kept_thin"]:
        lines.append(f"export: with its thin pairs the whole model measured {whole['thin_ms']:.3f} ms against "
                     f"{whole['dense_ms']:.3f} ms dense on {where}, not 3 % faster, so the export is the dense "
                     "model")
    if lines:
        deeper = [name for name, e in dense.items() if e.get("thin_pays_at_rank")]
        lines.append("  what would pay: " + (f"lower ranks in {', '.join(deeper)} (a deeper budget: target_speedup, "
                                             "prune_flops or a larger energy), " if deeper else "")
                     + "a larger export_batch, or another export_backend (svdtrain bench latency compares them)")
    return lines


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return "skipped: pip install 'svdtrain[tool]' for onnx and onnxscript"
    import logging
    import warnings

    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # it warns about torchvision ops it cannot find: irrelevant here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
    finally:
        onnx_log.setLevel(level)
    write_atomic(path, program.model_proto.SerializeToString())
    return str(path.name)


def stage_report(run: Run) -> dict:
    return write_report(run)


STAGE_FUNCTIONS = {"train": stage_train, "sparsify": stage_sparsify, "prune": stage_prune,
                   "finetune": stage_finetune, "export": stage_export, "report": stage_report}
# Stages that decide (which ranks) or measure (latency) run on rank 0 alone, so every process goes on
# with the same model: the others wait and then read what rank 0 wrote.
RANK0_STAGES = ("prune", "export", "report")


def run_stage(run: Run, stage: str, resume: bool = False) -> dict:
    """Run one stage, built in a hidden folder beside its old output and swapped in only when it has finished:
    a stage that fails leaves the run folder as it was. Without `resume` the build starts afresh; with it, an
    interrupted build continues from its last epoch checkpoint."""
    run.finish_swaps()
    run.check_inputs(stage)
    building = run.cluster.on_main(lambda: run.start_building(stage, resume))  # no process reads it before it is ready
    if run.cfg.threads:
        torch.set_num_threads(run.cfg.threads)
    run.echo(f"== {stage}")
    run.building[stage] = building
    try:
        if stage in RANK0_STAGES:
            result = run.cluster.on_main(lambda: STAGE_FUNCTIONS[stage](run.alone()))
        else:
            result = STAGE_FUNCTIONS[stage](run)
            run.cluster.barrier()  # what the stage wrote is complete before any process reads it
    except Exception:
        # Nothing to continue from (no epoch checkpoint): the attempt goes, and the folder is as it was.
        run.cluster.on_main(lambda: run.drop_failed_build(stage))
        raise
    finally:
        del run.building[stage]
    run.cluster.on_main(lambda: swap_in(run.folder, stage))
    return result


def run_all(run: Run, resume: bool = False) -> dict:
    """Every stage in order; with `resume`, finished stages are skipped and an interrupted one continues (an
    interrupted stage command's too). A finished stage whose input was rebuilt since (a stage command run on its
    own) runs again, and so do those after it."""
    result, skipping = {}, resume
    run.finish_swaps()
    run.echo(run.data_summary["line"])
    for stage in STAGES:
        if skipping and run.current(stage) and not (run.folder / f".{stage}.new").exists():
            run.echo(f"== {stage}: done")
            continue
        skipping = False
        result = run_stage(run, stage, resume=resume)
    return result
