"""Pattern -> Triton source. Nothing here parses text or touches tensors."""
from .backward import BackwardSpecialization, generate_backward
from .decode import DecodeSpecialization, generate_decode
from .forward import Specialization, generate_forward
from .lower import HeadParams, KernelPlan, lower

__all__ = ["KernelPlan", "HeadParams", "lower", "Specialization", "generate_forward",
           "BackwardSpecialization", "generate_backward"]
