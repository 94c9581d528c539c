"""lightning-ac: automatic activation checkpointing for PyTorch Lightning.

The pipeline, one module per stage, all on the same ``fx.Graph``:
``capture`` (joint forward+backward graph, rewritten by ``graph_passes``) → ``profiler`` (every
node measured) → ``planner`` (μ-TWO greedy, checked by ``simulator``) → ``rewriter`` (partition
and swap in, calling ``runtime_ops`` and ``swapping`` at run time). ``install.auto_checkpoint``
runs it for a module or a step function; ``callback.MuTwoAC`` drives that from Lightning.
"""

from lightning_ac.callback import MuTwoAC, StepMonitor
from lightning_ac.capture import capture_joint, capture_optimizer_step
from lightning_ac.errors import BudgetError, CaptureError
from lightning_ac.install import AutoCheckpoint, State, auto_checkpoint, parse_budget
from lightning_ac.planner import Plan, plan
from lightning_ac.profiler import Profile, profile_iteration, profile_joint, profile_step
from lightning_ac.rewriter import compile_with_plan
from lightning_ac.simulator import simulate

__all__ = [
    "AutoCheckpoint",
    "BudgetError",
    "CaptureError",
    "MuTwoAC",
    "Plan",
    "Profile",
    "State",
    "StepMonitor",
    "auto_checkpoint",
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
