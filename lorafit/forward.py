"""One forward pass of lorafit's own: the per-token NLL of a packed batch, the way this model may compute it.

Training (`train.Trainer.train_step`), evaluation (`evaluate.example_nll`), the fast-path check
(`fastpath`) and the preference objectives all call `Forward.token_nll`; nothing else runs a model's
forward for a loss. A `Forward` is built once, from the fast paths checked on the model (`FastPaths`)
and the precision resolved once (`modeling.resolve_precision`'s autocast dtype), and it owns:

- autocast (the compute dtype of the frozen base; the LoRA weights stay fp32);
- segment attention: registered with transformers when the first Forward is built (an explicit call,
  `attention.register()`, not a side effect of importing), and switched on, with the other speed-up
  switches, only around its own forwards (`fast.forward_state`);
- the head loss: the fused, chunked linear cross-entropy (`loss.linear_cross_entropy`, no full logits)
  where the check allowed it and the head is linear, else the model's own logits.

Only scored positions reach the head: padding and unscored prompt tokens are neither scored nor
computed there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from lorafit import attention
from lorafit.data.packing import IGNORE, Layout, PackedBatch
from lorafit.fast import forward_state
from lorafit.lora import unwrapped
from lorafit.loss import head_is_linear, linear_cross_entropy, plain_cross_entropy


@dataclass
class FastPaths:
    """The fast paths a model may use, as `lorafit.fastpath` checked them on the model itself: the batch
    layout (the data side: `data.packing`) and whether the fused head loss gives the model's own NLL."""

    layout: Layout
    fused_head: bool
    why_not: dict[str, str] = field(default_factory=dict)  # fast path -> why it is not used

    def record(self) -> dict:
        """What summary.json says: the layout used, the head loss, and why any path was refused."""
        return {"packing": self.layout.kind, "row_len": self.layout.row_len, "fused_head": self.fused_head,
                "why_not": dict(self.why_not)}


# Exact on any model that trains at all, with no check: one example a row, right-padded and masked, and
# the NLL from the model's own logits (fastpath refuses to train a model on which this is not exact).
PLAIN = FastPaths(Layout("padded"), fused_head=False)


class Forward:
    """The per-token NLL of a batch on `model` (PEFT-wrapped or not) with the fast paths `fast` and the
    compute dtype `autocast` (None: no autocast). `chunk`: rows of logits a chunk of the fused head loss
    (None: its default for the device)."""

    def __init__(self, model, fast: FastPaths, autocast: torch.dtype | None = None, *,
                 device: torch.device | None = None, chunk: int | None = None):
        attention.register()  # the segments layout's attention must be known to transformers before any forward
        self.model, self.base = model, unwrapped(model)
        self.fast, self.autocast_dtype, self.chunk = fast, autocast, chunk
        self.device = device or next(model.parameters()).device
        # The fused head needs a frozen bias-free linear head; whether the logits are that map alone is the
        # check's business (fastpath), this is its precondition.
        self.fused_head = fast.fused_head and head_is_linear(self.base)

    def autocast(self):
        """The precision every forward of this model runs in (also the fast-path check's plain forwards)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def token_nll(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL of every scored target in `batch`, the example index of each), in the batch's order.

        The hook every objective uses: training sums the NLL over a step; evaluation adds it up per example;
        a preference objective sums it per sequence (`example_index`) into log-probabilities. It carries a
        gradient whenever autograd is on (the fused head loss gives the hidden states theirs in the same pass)."""
        mask = batch.targets != IGNORE
        targets = batch.targets[mask]
        with self.autocast(), forward_state(self.model, self.base, batch.input_ids.device, segments=batch.segments is not None):
            if self.fused_head:
                hidden = getattr(self.base, self.base.base_model_prefix)(**model_inputs(batch)).last_hidden_state
                nll = linear_cross_entropy(hidden[mask], self.base.get_output_embeddings().weight, targets, self.chunk)
            else:
                nll = plain_cross_entropy(self.base(**model_inputs(batch)).logits[mask], targets)
        return nll, batch.example_ids[mask]

    def data_parallel(self) -> torch.nn.Module:
        """This forward's NLL (without the example index) as a DistributedDataParallel module: DDP's gradient
        hooks need a module whose forward reaches the backbone and the fused head, which `token_nll` calls directly."""
        # device_ids None: the module sits on this rank's one device, and the batch is not a tensor DDP should move.
        return DistributedDataParallel(_AsModule(self), device_ids=None)


class _AsModule(torch.nn.Module):
    def __init__(self, forward: Forward):
        super().__init__()
        self.model = forward.model  # registered: DDP finds the parameters to all-reduce here
        self.nll = forward.token_nll

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.nll(batch)[0]


def model_inputs(batch: PackedBatch) -> dict:
    """The forward's keyword arguments for a batch of any layout."""
    if batch.attention_mask is not None:  # padded: the model's own positions and mask, as in a plain forward
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if batch.segments is not None:
        inputs["segment_bounds"] = batch.segments
    return inputs
