"""Experiment loggers (``conf/logger``): none, or Weights & Biases (offline unless logged in)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class NoLogger:
    def log_round(self, row: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class WandbLogger(NoLogger):
    def __init__(self, cfg: DictConfig, output_dir: Path):
        import wandb

        self._run = wandb.init(
            project=cfg.logger.project, mode=cfg.logger.mode, dir=str(output_dir),
            name=f"{cfg.strategy.name}-{cfg.dataset.name}-s{cfg.simulation.seed}",
            config=OmegaConf.to_container(cfg, resolve=True),
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


def make_logger(cfg: DictConfig, output_dir: Path) -> NoLogger:
    return WandbLogger(cfg, output_dir) if cfg.logger.name == "wandb" else NoLogger()
