"""The one place that decides which fast paths a model may use, by a check on the model itself.

Each fast path gives what the model's own plain `forward` gives only if the model's code plays
along: the fused head loss needs the logits to be the head's linear map of the last hidden state
(no soft-capping or scaling after it); packed rows need an attention mask that honours restarting
positions (OPT and Bloom build theirs without them); segment attention needs attention that goes
through transformers' attention interface and no window shorter than an example. No list of
config attributes foresees every family, so each path is run here on the model itself -- the
training code path, on examples as long as `data.seq_len` -- against the model's own forward on
each example alone, and used only where the two agree. Elsewhere lorafit falls back (plain logits;
one example a row, right-padded and masked) and says why.

Before any of that, `check_causal` refuses a model whose forward is not causal (an encoder such as
BERT loaded as a causal LM attends both ways, so its next-token loss would see the future): a later
token changed must leave every earlier logit as it was. Again the model itself is asked, not a list
of config types.

Train, eval and bench ask `choose_fast_paths`; none of them re-decides. The training code path checked
here is `lorafit.forward.Forward`, the one forward training and evaluation run.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from lorafit.data.packing import Layout, pack, shape_multiple
from lorafit.data.tokenize import TokenizedSplit
from lorafit.errors import LorafitError, described
from lorafit.forward import FastPaths, Forward
from lorafit.lora import unwrapped
from lorafit.loss import head_is_linear
from lorafit.modeling import max_positions

# Per-token NLL gaps taken as rounding in fp32 (measured: 0 to 6e-6 on random GPT-2s at seq 512).
FP32_TOLERANCE = 5e-5
# Earlier logits may move by this share of the change at the changed position and still be rounding
# (causal models: exactly 0, the same operations on the same inputs; a tiny random BERT: 2e-3).
CAUSAL_SHARE = 1e-4
# In half precision a gap may also be rounding when it is this small a part of the gap of attention
# that crosses examples (bf16 rounding of large logits is large; measured: packed 0, crossing 0.06-2.4).
CROSSED_SHARE = 0.1


def rows_length(pack_len: int | None, seq_len: int, max_positions: int | None) -> int:
    """Packed row length: no longer than an example may be by default, so masked attention stays cheap."""
    row_len = pack_len or seq_len
    return row_len if max_positions is None else max(seq_len, min(row_len, max_positions))


def preference(packing: str, device: torch.device, compile: bool, checkpointing: bool = False) -> list[str]:
    """Layouts to try, best first. Segments: no padding slot at all, but one attention call per
    example, which costs kernel launches on a GPU, retraces under compile, and is not in force when
    gradient checkpointing recomputes a layer in the backward (it is switched on for the forward only)."""
    if packing != "auto":
        return [packing]
    if compile or checkpointing:
        return ["rows", "padded"]
    return ["segments", "rows", "padded"] if device.type == "cpu" else ["rows", "segments", "padded"]


def choose_fast_paths(model, *, packing: str, device: torch.device, compile: bool, seq_len: int, row_len: int,
                      autocast_dtype: torch.dtype | None = None, log=None, checkpointing: bool = False,
                      sharded: bool = False) -> FastPaths:
    """Check the fused head and the layouts on `model` (its base, LoRA and speed-ups as trained) and
    pick: the first layout of `preference` that is exact; an explicit `packing` that is not exact is an
    error. `log` gets one line when a fallback is taken."""
    if packing == "segments" and compile:
        raise LorafitError(
            "data.packing=segments cannot be compiled (example boundaries change every batch, so "
            "torch.compile would recompile); use data.packing=rows with train.compile=true."
        )
    if packing == "segments" and checkpointing:
        raise LorafitError(
            "data.packing=segments cannot be used with train.gradient_checkpointing (the layers recomputed in the "
            "backward would not attend example by example); use data.packing=rows or auto."
        )
    check_causal(model, device)
    probe = _Probe(model, device, seq_len, autocast_dtype)
    with probe.evaluating():
        why_not = {}
        fused = probe.head_reason(sharded)
        if fused:
            why_not["fused_head"] = fused
        for kind in preference(packing, device, compile, checkpointing):
            layout = Layout(kind, row_len if kind == "rows" else None)
            reason = probe.layout_reason(layout, fused_head=not fused)
            if reason is None:
                break
            why_not[kind] = reason
            if packing != "auto":
                raise LorafitError(
                    f"data.packing={packing}: {reason}, so training would not compute what the model computes. "
                    "Use data.packing=auto, which picks a layout that is exact for this model."
                )
        else:
            raise LorafitError(
                "This model gives different results for the same example in a batch than alone, even one example "
                f"a row ({why_not['padded']}); lorafit cannot train it exactly."
            )
    paths = FastPaths(layout, not fused, why_not)
    if log and why_not:
        log("fast paths checked on the model: " + "; ".join(f"no {k}: {v}" for k, v in why_not.items())
            + f". Using {layout}" + ("" if paths.fused_head else ", plain logits") + ".")
    return paths


def check_causal(model, device: torch.device, length: int = 8) -> None:
    """Refuse a model whose logits at a position depend on later tokens: two forwards of a short random
    input that differ only in the last token, whose earlier logits must agree (to rounding)."""
    base = unwrapped(model)
    ids = torch.randint(0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % base.config.vocab_size
    was_training = model.training
    model.eval()  # no dropout: the two forwards must differ only by the token
    try:
        with torch.no_grad():
            first, second = (base(input_ids=x.to(device), use_cache=False).logits[0].double() for x in (ids, changed))
    finally:
        model.train(was_training)
    earlier = float((first[:-1] - second[:-1]).abs().max())
    scale = float((first[-1] - second[-1]).abs().max())
    if earlier > CAUSAL_SHARE * max(scale, 1e-6):
        raise LorafitError(
            f"The model's forward is not causal: changing the last token of an input changed the logits at earlier "
            f"positions (by up to {earlier:.3g}), so {type(base).__name__} attends to later tokens and a next-token loss "
            "on it would see the future. lorafit trains causal (decoder-only) language models: choose one for "
            "model.name (an encoder such as BERT is not one, unless its config enables a causal decoder mode, "
            "e.g. is_decoder: true)."
        )


class _Probe:
    """Three examples (one as long as data.seq_len, two short), the model's own per-token NLL of each
    alone, and the NLL of the same examples when attention crosses them: the scale of a wrong answer."""

    def __init__(self, model, device: torch.device, seq_len: int, autocast_dtype: torch.dtype | None):
        self.model, self.base, self.device, self.autocast_dtype = model, unwrapped(model), device, autocast_dtype
        gen = torch.Generator().manual_seed(0)
        vocab = self.base.config.vocab_size
        lengths = (max(2, seq_len), min(4, seq_len), min(6, seq_len))
        examples = [torch.randint(0, vocab, (n,), generator=gen).numpy().astype(np.int32) for n in lengths]
        n = np.array(lengths, dtype=np.int64)
        self.split = TokenizedSplit(
            ids=np.concatenate(examples), offsets=np.concatenate([[0], np.cumsum(n)]),
            sources=np.zeros(3, np.int32), n_bytes=np.ones(3, np.int64), truncated=np.zeros(3, bool),
        )
        self.examples = [torch.from_numpy(e.astype(np.int64)).to(device) for e in examples]

    @contextlib.contextmanager
    def evaluating(self):
        """No dropout, no gradients, the training precision; the model's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.forward(fused_head=False).autocast():
                self.logit_scale = 0.0
                self.alone = torch.cat([self._plain_nll(e[None, :-1], e[1:]) for e in self.examples])
                self.crossed_gap = self._crossed_gap()
                yield self
        finally:
            self.model.train(was_training)

    def _plain_nll(self, inputs: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """The model's own forward: per-token NLL from its logits, in float64."""
        logits = self.base(input_ids=inputs, use_cache=False, **kwargs).logits[0]
        self.logit_scale = max(self.logit_scale, float(logits.detach().abs().max()))
        return -logits.double().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    def _crossed_gap(self) -> float:
        """The examples in one row, positions restarting, but with a full attention mask, which turns
        off transformers' packed-sequence detection: attention crosses examples."""
        row = torch.cat([e[:-1] for e in self.examples])
        targets = torch.cat([e[1:] for e in self.examples])
        positions = torch.cat([torch.arange(len(e) - 1, device=self.device) for e in self.examples])
        try:
            crossed = self._plain_nll(row[None], targets, position_ids=positions[None],
                                      attention_mask=torch.ones_like(row)[None])
        except Exception:  # noqa: BLE001 - a model without position ids: no crossing scale, rounding alone judges
            return 0.0
        return float((crossed - self.alone).abs().max())

    def _tolerance(self) -> float:
        dtype = self.autocast_dtype or next(self.base.parameters()).dtype
        if dtype in (torch.float32, torch.float64):
            return FP32_TOLERANCE
        return 4 * torch.finfo(dtype).eps * max(1.0, self.logit_scale)

    def forward(self, layout: Layout = Layout("padded"), fused_head: bool = False) -> Forward:
        """The forward training would run with these fast paths."""
        return Forward(self.model, FastPaths(layout, fused_head), self.autocast_dtype, device=self.device)

    def _gap(self, layout: Layout, fused_head: bool) -> float:
        nll = torch.zeros(len(self.alone), dtype=torch.float64, device=self.device)
        offsets = np.concatenate([[0], np.cumsum([len(e) - 1 for e in self.examples])])
        indices = np.arange(3)
        batch = pack(self.split, indices, layout, pad_id=0, multiple=shape_multiple(self.device)).to(self.device)
        values, example = self.forward(layout, fused_head).token_nll(batch)
        # Forward.token_nll returns targets in the batch's order; place each at its example's own position.
        for i in indices:
            sel = example == i
            nll[offsets[i] : offsets[i + 1]] = values[sel].double()
        return float((nll - self.alone).abs().max())

    def head_reason(self, sharded: bool = False) -> str | None:
        """Why the fused head loss may not be used (None: it gives the model's own logits' NLL)."""
        if sharded:  # the fused loss calls the backbone alone, outside the sharded model's gathering forward
            return "train.fsdp: the model is sharded, and its forward gathers the head's weight"
        if not head_is_linear(self.base):
            return "the output head is not one frozen bias-free linear layer"
        try:
            gap = self._gap(Layout("padded"), fused_head=True)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use it with this model
            return f"the fused head loss failed ({described(exc)})"
        if gap > self._tolerance():
            return f"the model's logits are not its head's linear map of the last hidden state (NLL gap {gap:.3g})"
        return None

    def layout_reason(self, layout: Layout, fused_head: bool) -> str | None:
        """Why `layout` may not be used (None: every example gets the NLL it gets alone)."""
        try:
            gap = self._gap(layout, fused_head)
        except Exception as exc:  # noqa: BLE001 - e.g. segment attention meeting a sliding window
            return f"{layout.kind} failed on this model ({described(exc)})"
        if gap <= self._tolerance() or (self.crossed_gap and gap <= CROSSED_SHARE * self.crossed_gap):
            return None
        return f"{layout.kind}: packed examples do not get the log-probabilities they get alone (max NLL gap {gap:.3g})"


def fast_paths_for(model, cfg, device: torch.device, autocast_dtype: torch.dtype | None, log=None) -> FastPaths:
    """`choose_fast_paths` with the settings of a RunConfig (data.packing, seq_len, pack_len, train.compile)."""
    d = cfg.data
    return choose_fast_paths(
        model, packing=d.packing, device=device, compile=cfg.train.compile, seq_len=d.seq_len,
        row_len=rows_length(d.pack_len, d.seq_len, max_positions(unwrapped(model))), autocast_dtype=autocast_dtype, log=log,
        checkpointing=cfg.train.gradient_checkpointing, sharded=cfg.train.fsdp,
    )
