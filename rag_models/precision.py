"""Where mixed precision must not reach: scores, log-likelihoods and losses stay in float32 under autocast.

Under Lightning's ``bf16-mixed`` / ``16-mixed`` the forward runs inside ``torch.autocast``, which
computes every matmul in half precision. The encoders and the generator may (that is the point),
but a number that becomes a softmax, a logsumexp or a loss must not:

- q . d sums D = 768 products; rounded to bf16 (8 significant bits) a score of 80 moves by up to
  0.25, enough to reorder close docs and to shift p(z|x); in fp16 a score above 65,504 is inf
  and the loss NaN.
- ``log_softmax`` / ``logsumexp`` of half logits lose the small differences the marginal over
  docs is made of.

So these helpers upcast half tensors to float32 (float64 stays float64) and run their matmul
with autocast switched off, whatever device the tensors are on. Everything downstream of them
(`rag_models.marginalize`, the decoders' step scores and doc posteriors, DPR's in-batch loss)
then sees float32 and stays there: the elementwise ops and reductions that follow are not on
autocast's lists, or are on its float32 list.
"""
from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged (no copy)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def full_precision_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in at least float32, never lowered by an enclosing autocast: (..., n, m) @ (..., m, p).

    Both operands are promoted to their common dtype and at least float32; the result has that dtype.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        return torch.matmul(a.to(dtype), b.to(dtype))
