"""Experiment loggers (``conf/logger``): none, or Weights & Biases (offline unless logged in)."""

from __future__ import annotations

from pathlib import Path

from octomil_sim.spec import RunSpec


class NoLogger:
    def log_round(self, row: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class WandbLogger(NoLogger):
    def __init__(self, spec: RunSpec, output_dir: Path):
        import wandb

        self._run = wandb.init(
            project=spec.logger.project, mode=spec.logger.mode, dir=str(output_dir),
            name=f"{spec.strategy.name}-{spec.dataset.name}-s{spec.simulation.seed}",
            config=spec.config,
        )

    def log_round(self, row: dict) -> None:
        self._run.log({k: v for k, v in row.items() if k != "round"}, step=row["round"])

    def finish(self, summary: dict) -> None:
        """Once: the run's summary and the end of the W&B run (later calls do nothing)."""
        if self._run is None:
            return
        self._run.summary.update(summary)
        self._run.finish()
        self._run = None


def make_logger(spec: RunSpec, output_dir: Path) -> NoLogger:
    return WandbLogger(spec, output_dir) if spec.logger.name == "wandb" else NoLogger()
