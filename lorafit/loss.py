"""Per-token negative log-likelihood without materialising the full logits (the arithmetic; which head
loss a model's forward uses is lorafit.forward's choice).

The LM head of a small model is most of the memory of a long batch (50,257 fp32 logits a token:
3.3 GB at 16k tokens). `linear_cross_entropy` computes logits a chunk of tokens at a time, and,
when a gradient is needed, the gradient with respect to the hidden states in the same pass
(d nll / d h = (softmax - onehot) @ W), keeping that (N x d) instead of (N x V) logits. The
frozen head gets no gradient, so this costs the same matmuls as the plain path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorafit.fast import head_buffer

DEFAULT_CHUNK = 2048
CPU_CHUNK = 512  # rows of logits a chunk on CPU, where the chunk's buffer is kept (512 x 50257 fp32: 103 MB)
VOCAB_ALIGN = 64  # tensor-core GEMMs need aligned sizes; 50257 is not, and costs ~2x on the LM head

def _aligned_head(weight: torch.Tensor) -> torch.Tensor:
    """The head weight with zero rows appended to a multiple of VOCAB_ALIGN (CUDA only; the extra
    logits are masked out below). On CPU alignment buys nothing and the copy would cost."""
    vocab = weight.shape[0]
    if weight.device.type != "cuda" or vocab % VOCAB_ALIGN == 0:
        return weight
    return F.pad(weight, (0, 0, 0, -vocab % VOCAB_ALIGN))


def _logits(h: torch.Tensor, weight: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """One chunk's logits in acc_dtype; on CPU into the head loss's kept buffer (lorafit.fast.head_buffer)."""
    if h.device.type != "cpu" or h.dtype != acc_dtype:
        return (h @ weight.t()).to(acc_dtype)

    rows, cols = h.shape[0], weight.shape[0]
    return torch.mm(h, weight.t(), out=head_buffer(rows * cols, acc_dtype).view(rows, cols))


def _nll_and_grad_logits(logits: torch.Tensor, t: torch.Tensor, need_grad: bool, in_place: bool):
    """(nll, d nll / d logits = softmax - onehot, or None) of one chunk; may overwrite `logits`.

    in_place (CPU): the softmax is taken in the logits buffer, with no second 50 MB tensor to
    fault in. Otherwise (GPU) one fused log_softmax kernel reads the logits once, which there
    beats the extra passes of the in-place form."""
    if in_place:
        target_logit = logits.gather(1, t)
        peak = logits.amax(1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        total = probs.sum(1, keepdim=True)
        nll = (peak + total.log() - target_logit).squeeze(1)  # log-sum-exp minus the target's logit
        probs = probs.div_(total) if need_grad else None
    else:
        logp = torch.log_softmax(logits, dim=1)
        nll = -logp.gather(1, t).squeeze(1)
        probs = logp.exp_() if need_grad else None
    if need_grad:
        probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
    return nll, probs


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        vocab = weight.shape[0]
        weight = _aligned_head(weight)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        pieces = max(1, math.ceil(n / chunk))
        chunk = max(1, math.ceil(n / pieces))  # equal chunks: a small last one makes a slow GEMM
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk].unsqueeze(1)
            logits = _logits(h, weight, acc_dtype)
            if logits.shape[1] != vocab:
                logits[:, vocab:] = float("-inf")  # padded rows: probability exactly 0
            nll[start : start + chunk], grad_logits = _nll_and_grad_logits(
                logits, t, need_grad, in_place=logits.device.type == "cpu"
            )
            if need_grad:
                grad_hidden[start : start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, grad_logits
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll.unsqueeze(1).to(grad_hidden.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """NLL of each target (N,) given hidden states (N, d) and a frozen, bias-free head weight (V, d)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the head weight; it must be frozen")
    chunk = chunk or (CPU_CHUNK if hidden.device.type == "cpu" else DEFAULT_CHUNK)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference path: full fp32 logits, per-token NLL."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def head_is_linear(model) -> bool:
    """The head is one frozen, bias-free linear map: the precondition of the fused loss. Whether the
    model's logits are that map alone (no soft-capping, scaling...) is checked by lorafit.fastpath."""
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad
