"""lightning-ac: automatic activation checkpointing for PyTorch Lightning.

The pipeline, one module per stage, all on the same ``fx.Graph``:
``capture`` (joint forward+backward graph) → ``profiler`` (every node measured) →
``planner`` (μ-TWO greedy, checked by ``simulator``) → ``rewriter`` (partition and swap in);
``callback.MuTwoAC`` drives it from Lightning.
"""

from lightning_ac.callback import BudgetError, MuTwoAC, StepMonitor, parse_budget
from lightning_ac.capture import CaptureError, capture_joint, capture_optimizer_step
from lightning_ac.planner import Plan, plan
from lightning_ac.profiler import Profile, profile_iteration, profile_joint, profile_step
from lightning_ac.rewriter import compile_with_plan
from lightning_ac.simulator import simulate

__all__ = [
    "BudgetError",
    "CaptureError",
    "MuTwoAC",
    "Plan",
    "Profile",
    "StepMonitor",
    "capture_joint",
    "capture_optimizer_step",
    "compile_with_plan",
    "parse_budget",
    "plan",
    "profile_iteration",
    "profile_joint",
    "profile_step",
    "simulate",
]
__version__ = "0.1.0"
