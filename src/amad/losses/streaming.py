"""The streaming forms of the map losses, gathered under one name.

Each family's file owns its streaming form (it never holds a whole
``(B, H, q, k)`` map): the probabilities are recomputed from the recorded Q/K
(+ bias, mask, causality) one block of query rows at a time by the engine in
``_blockwise``, in the forward and again in the backward pass. Each function takes
the Teacher's (detached) and the Student's :class:`~amad.attention.AttentionInputs`
and returns the same scalar, with the same gradients, as the family's map loss
on ``probs()`` with mask ``combined_mask(teacher, student)``. How each becomes a
sum over blocks is written beside it: AMAD mse / s2t through the Gram identity
(``_gram``), AMAD kl in two passes, token-level and KL forms per row, one-to-one
mse from three sums per head, SHD with one Teacher pass per merge round.
"""

from ._gram import explained_rows_loss
from .alignment import streaming_amad as amad
from .head_mean import streaming_head_mean as head_mean
from .one_to_one import streaming_one_to_one as one_to_one
from .shd import squeeze_coefficients
from .shd import streaming_shd as shd

__all__ = ["amad", "one_to_one", "head_mean", "shd", "explained_rows_loss", "squeeze_coefficients"]
