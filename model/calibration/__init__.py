"""IndexCache calibration: greedy F/S layer search on calibration data, cross-layer top-k overlap,
and training-aware indexer distillation (paper sections 3.1-3.2). No serving imports."""

from model.calibration.data import CalibrationData, load_calibration
from model.calibration.distill import DistillConfig, IndexerDistiller, export_checkpoint
from model.calibration.evaluate import PlanEvaluator
from model.calibration.overlap import topk_overlap
from model.calibration.plan_file import read_plan, write_plan
from model.calibration.search import SearchResult, greedy_search

__all__ = [
    "CalibrationData",
    "DistillConfig",
    "IndexerDistiller",
    "PlanEvaluator",
    "SearchResult",
    "export_checkpoint",
    "greedy_search",
    "load_calibration",
    "read_plan",
    "topk_overlap",
    "write_plan",
]
