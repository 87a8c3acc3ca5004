"""Head parallelism (S-HPLB): placing heads on GPUs and running attention split by heads.

``placement`` balances the analyzer's per-head costs over GPUs; ``heads`` restricts a
pattern to the heads one GPU owns; ``distributed`` runs attention and Hugging Face
attention layers split by heads over ``torch.distributed``.
"""
from .heads import restrict
from .placement import Placement, PlacementError, head_costs, place

__all__ = ["Placement", "PlacementError", "head_costs", "place", "restrict"]
