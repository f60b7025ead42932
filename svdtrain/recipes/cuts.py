"""The cuts of a run toward its budget (a speed, FLOPs or parameters): ranks by `prune_`, channels by filter
pruning, gradually on the cubic schedule, and the deployment's speed-up measured. Mixed into `Run` (run.py).

Under torchrun every process keeps the same model: what is decided from timings (a speed target's ranks and
channels) is decided by rank 0 and taken by every process."""

from __future__ import annotations

import copy

import torch
from torch import nn

import svdtrain
from svdtrain.channels import resize_to_state_
from svdtrain.export import export_decisions
from svdtrain.forms import dense_copy
from svdtrain.latency import paired_timing, runner, threads
from svdtrain.layers import svd_layers
from svdtrain.prune import PruneReport

from .baselines import filter_prune_, input_covariances, normalize_v_, weigh_by_inputs_
from .files import load_into
from .train import evaluate


class Cuts:
    """The cuts and speed measurement of a run (a mixin of `Run`: it uses the run's config, data and cluster)."""

    @property
    def budget_fraction(self) -> float | None:
        """The run's budget as a fraction of the dense model: its latency (1 / target_speedup), FLOPs or params."""
        cfg = self.cfg
        return 1 / cfg.target_speedup if cfg.target_speedup else cfg.prune_flops or cfg.prune_params or None

    def prune(self, model: nn.Module, fraction: float | None = None, reach: bool = True) -> PruneReport:
        """prune_ by the run's budget (`fraction` of the dense model in place of it), else by energy.

        target_speedup is a latency budget on the deployment: the ranks are chosen by rank 0 on a CPU copy from
        per-layer times measured on export_backend at export_batch on export_threads, then cut to in `model` by
        every process. With `reach`
        a latency no ranks are predicted to meet gets the fastest ranks there are (timings wander by a few per
        cent from cut to cut), else it is an error. With rank_score=output each singular value counts by its
        share of the layer's output on whiten_images training images rather than by its size."""
        if self.cfg.rank_score != "output":
            return self._prune_by_size(model, fraction, reach)
        weighed = weigh_by_inputs_(model, input_covariances(model, self.calibration_batches(model, self.cfg.whiten_images)))
        try:
            return self._prune_by_size(model, fraction, reach)
        finally:
            normalize_v_(model, weighed)

    def _prune_by_size(self, model: nn.Module, fraction: float | None, reach: bool) -> PruneReport:
        cfg = self.cfg
        options = dict(min_rank=cfg.min_rank, rank_multiple=cfg.rank_multiple or None)
        if cfg.prune_channels:
            return self._prune_with_channels(model, fraction, reach, options)
        if cfg.target_speedup:
            def decide() -> PruneReport:  # from timings, which differ between processes: rank 0 decides for all
                with threads(cfg.export_threads):
                    return svdtrain.prune_(copy.deepcopy(model).cpu(), latency=fraction or self.budget_fraction,
                                           example_inputs=self.example_input(cfg.export_batch),
                                           backend=cfg.export_backend, reach=reach, **options)

            report = self.cluster.on_main(decide)
            for (_, layer), row in zip(svd_layers(model), report.layers):
                if row["rank_after"] < layer.rank:
                    layer.truncate_(row["rank_after"])
            return report
        knob = ({"flops": fraction or cfg.prune_flops} if cfg.prune_flops else
                {"params": fraction or cfg.prune_params} if cfg.prune_params else {"energy": cfg.energy})
        device = next(model.parameters()).device
        return svdtrain.prune_(model, **knob, example_inputs=self.example_input().to(device), **options)

    def _prune_with_channels(self, model: nn.Module, fraction: float | None, reach: bool, options: dict) -> PruneReport:
        """prune_(channels=True) toward the run's budget as a fraction of the dense model before SVD training (the
        budget's reference however many channels earlier cuts removed), decided by rank 0 on a CPU copy (timings
        differ between processes); every process then takes its weights and widths."""
        cfg = self.cfg
        if cfg.target_speedup:
            knob = {"latency": fraction or self.budget_fraction, "backend": cfg.export_backend, "reach": reach}
            example = self.example_input(cfg.export_batch)
        else:
            knob = ({"flops": fraction or cfg.prune_flops} if cfg.prune_flops else
                    {"params": fraction or cfg.prune_params} if cfg.prune_params else {"energy": cfg.energy})
            example = self.example_input()

        def decide():
            candidate = copy.deepcopy(model).cpu()
            with threads(cfg.export_threads if cfg.target_speedup else 0):
                report = svdtrain.prune_(candidate, **knob, example_inputs=example, channels=True,
                                         reference=self.dense_reference, rank_energy=cfg.rank_energy,
                                         **options)
            return report, candidate.state_dict()

        report, state = self.cluster.on_main(decide)
        self.take_cut(model, state, "a cut of ranks and channels")
        return report

    def take_cut(self, model: nn.Module, state: dict, what: str):
        """`model` becomes the cut copy whose state rank 0 sent: its widths and weights, on the model's device, in
        its mode."""
        device, training = next(model.parameters()).device, model.training
        resize_to_state_(model, state)
        load_into(model, state, what)
        model.to(device).train(training)
        if self.cfg.channels_last:
            model.to(memory_format=torch.channels_last)

    @property
    def dense_reference(self) -> nn.Module | None:
        """The dense model SVD training started from (the train stage's, every SVD layer dense), on the CPU: what a
        budget is a fraction of once channels are removed; None before the train stage is done (the preflight's
        model is at its full widths)."""
        if "_dense_reference" not in self.__dict__ and self.done("train"):
            self._dense_reference = dense_copy(self.model_after("train")).cpu().eval()
        return self.__dict__.get("_dense_reference")

    def scheduled_fraction(self, progress: float) -> float:
        """The cubic schedule (Zhu & Gupta's gradual pruning): at `progress` p of the stage the model may keep
        budget + (1 − budget)·(1 − p)³ of the dense latency / FLOPs / params, so most goes early, while the network
        still has many steps to adapt, and the last cut (p = 1) lands on the budget."""
        budget = self.budget_fraction
        return budget + (1 - budget) * (1 - progress) ** 3

    def gradual_cut(self, model: nn.Module, progress: float) -> bool:
        """One rank cut of the cubic schedule (`scheduled_fraction`)."""
        report = self.prune(model, self.scheduled_fraction(progress))
        if report.cut:
            said, anchor = [], report.latency_anchor
            if report.latency_after_ms is not None:
                measured = "" if not anchor else (
                    f"; {'before the cut' if anchor['at'] == 'as it stands' else anchor['at']} measured "
                    f"{anchor['measured']:.3f}, layer times said {anchor['predicted']:.3f}")
                said.append(f"latency {report.latency_after_ms / report.dense_latency_ms:.3f} of dense "
                            f"({'measured' if report.channels else 'predicted'} on {report.backend}{measured})")
            if report.flops_after is not None:
                said.append(f"FLOPs {report.flops_after / report.dense_flops:.3f} of dense")
            said.append(f"params {report.params_after / report.dense_params:.3f} of dense")
            said = said[:2] + ([channels_kept(report)] if report.channels else [])
            self.echo(f"  {'rank and channel' if report.channels else 'rank'} cut at {progress:.0%} of the stage: "
                      f"{', '.join(said)}")
            self.log_cut(model, progress, flops=report.flops_after and report.flops_after / report.dense_flops,
                         latency=report.latency_after_ms and report.latency_after_ms / report.dense_latency_ms,
                         **({"channels": {row["name"]: row["channels_after"] for row in report.channels},
                             "ranks": {row["name"]: row["rank_after"] for row in report.layers}}
                            if report.channels else {}))
        return report.cut

    def log_cut(self, model: nn.Module, progress: float, **measured):
        """A gradual cut's row of sparsify/cuts.json; with cut_eval_images, the model's accuracy right after it: as
        training goes on with it ("accuracy_before_bn_recalibration") and, on a copy whose batch-norm statistics are
        re-estimated as the prune stage's are ("accuracy"), so that the curve shows what the cut itself cost."""
        row = {"progress": progress, **measured}
        if self.cfg.cut_eval_images:
            training = model.training
            split = self.data.test.subset(self.cfg.cut_eval_images, "cut_eval_images")
            row["accuracy"] = evaluate(model, self.data, split, self.cfg, self.cluster)[0]
            model.train(training)  # evaluation leaves it in eval mode; training goes on
            if self.cfg.bn_recalibrate:
                recalibrated = copy.deepcopy(model)
                self.recalibrate_bn(recalibrated)
                row["accuracy_before_bn_recalibration"] = row["accuracy"]
                row["accuracy"] = evaluate(recalibrated, self.data, split, self.cfg, self.cluster)[0]
            self.echo(f"  accuracy right after the cut: {row['accuracy']:.2f} % on {len(split):,} images")
        self.cuts.append(row)

    def measured_speedup(self, model: nn.Module) -> dict:
        """{speedup, speedup_iqr}: `model` (SVD form) exported for the deployment against its dense form, as the
        export's own whole-model check timed them alternately there (export_backend at export_batch on
        export_threads; median of the paired ratios); 1× when the export is the dense model. With prune_channels,
        against the dense model before any channel was cut."""
        cfg = self.cfg
        x = self.example_input(cfg.export_batch)
        with threads(cfg.export_threads):
            small, decisions = export_decisions(copy.deepcopy(model).cpu().eval(), x, "latency", cfg.export_backend)
            if cfg.prune_channels:  # the export's own check times it against its dense form, at the cut widths
                timed = paired_timing(runner(self.dense_reference, x, cfg.export_backend),
                                      runner(small, x, cfg.export_backend), 2.0)
                return {"speedup": timed["speedup"], "speedup_iqr": timed["speedup_iqr"]}
        whole = decisions["whole"]
        if whole is None or not whole["kept_thin"]:
            return {"speedup": 1.0, "speedup_iqr": [1.0, 1.0]}
        return {"speedup": whole["speedup"], "speedup_iqr": whole["speedup_iqr"]}

    def speed_line(self, speed: dict) -> str:
        cfg = self.cfg
        low, high = speed["speedup_iqr"]
        where = f"{cfg.export_threads} thread{'s' * (cfg.export_threads > 1)}" if cfg.export_threads else \
            "the run's threads"
        return (f"measured at the deployment ({cfg.export_backend}, batch {cfg.export_batch}, {where}): "
                f"{speed['speedup']:.2f}× the dense model's speed (IQR {low:.2f}–{high:.2f}), target "
                f"{cfg.target_speedup:g}×")

    def filter_prune(self, model: nn.Module, fraction: float | None = None, reference: nn.Module | None = None) -> dict:
        """filter_prune_ to the run's budget (`fraction` of the dense latency or FLOPs in place of it): target_speedup
        measured on the deployment, or prune_flops; measured against `reference` (the dense model) when given."""
        cfg = self.cfg
        fraction = fraction or self.budget_fraction
        target = {"speedup": 1 / fraction} if cfg.target_speedup else {"flops": fraction}
        with threads(cfg.export_threads if cfg.target_speedup else 0):
            return filter_prune_(model, self.example_input(cfg.export_batch if cfg.target_speedup else 1),
                                 self.excluded(model), **target, backend=cfg.export_backend,
                                 importance="l1" if cfg.method == "filter_pruning" else "group",
                                 round_to=cfg.round_to or None, reference=reference)

    def gradual_channel_cut(self, model: nn.Module, progress: float, dense: nn.Module) -> bool:
        """One cut of the cubic schedule (`scheduled_fraction`) for the filter prunings: channels are removed until
        the model keeps at most that fraction of the dense FLOPs, or runs at least its inverse times the dense
        model's speed, measured on the deployment against `dense` (the train stage's model). Decided by rank 0 on a
        CPU copy; every process then takes its weights. Returns whether channels were removed (the parameters are
        then new)."""
        cfg, fraction = self.cfg, self.scheduled_fraction(progress)

        def decide():
            candidate = copy.deepcopy(model).cpu()
            out = self.filter_prune(candidate, fraction, reference=dense)
            return out, candidate.state_dict() if out["cut"] else None

        out, state = self.cluster.on_main(decide)
        if state is None:
            return False
        self.take_cut(model, state, "a gradual channel cut")
        reached = f"{out['speedup']:.2f}× the dense model's speed measured on {cfg.export_backend}" \
            if "speedup" in out else f"FLOPs {out['flops'] / out['dense_flops']:.3f} of dense"
        removed = channels_removed(out, "dense channels")
        self.echo(f"  channel cut at {progress:.0%} of the stage: {removed}, {reached}")
        self.log_cut(model, progress, flops=out["flops"] / out["dense_flops"], speedup=out.get("speedup"))
        return True


def channels_removed(pruned: dict, of: str = "channels") -> str:
    """What one filter pruning removed, as filter_prune_ returned it."""
    steps = pruned.get("global_steps")
    return (f"{pruned['channel_ratio']:.3f} of each layer's {of} removed"
            + (f", then {steps} global step{'s' * (steps > 1)} of the least important" if steps else ""))


def channels_kept(report: PruneReport) -> str:
    """How many channels a cut with channels kept, over the groups it could cut."""
    rows = [row for row in report.channels if not row["why_kept"]]
    return (f"channels {sum(row['channels_after'] for row in rows)} of {sum(row['channels_before'] for row in rows)} "
            f"in {len(rows)} groups")


def merged(first: PruneReport, second: PruneReport) -> PruneReport:
    """One report for two prunes in a row: the ranks and costs before the first, after the second."""
    for row, before in zip(second.layers, first.layers):
        row["rank_before"] = before["rank_before"]
    for row, before in zip(second.channels, first.channels):
        row["channels_before"] = before["channels_before"]
    second.flops_before, second.params_before = first.flops_before, first.params_before
    second.latency_before_ms = first.latency_before_ms
    return second
