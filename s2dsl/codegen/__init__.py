"""Pattern -> Triton source. Nothing here parses text or touches tensors."""
from .lower import KernelPlan, HeadParams, lower
from .forward import Specialization, generate_forward

__all__ = ["KernelPlan", "HeadParams", "lower", "Specialization", "generate_forward"]
