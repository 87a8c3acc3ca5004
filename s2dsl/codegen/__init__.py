"""Pattern -> Triton source. Nothing here parses text or touches tensors."""
from .lower import KernelPlan, HeadParams, lower
from .forward import Specialization, generate_forward
from .backward import BackwardSpecialization, generate_backward

__all__ = ["KernelPlan", "HeadParams", "lower", "Specialization", "generate_forward"]
