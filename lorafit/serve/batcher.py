"""The request batcher: one worker thread runs every waiting completion row through one decode loop.

Rows for different adapters (or the base, "__base__") share each forward pass through PEFT's
mixed-adapter batch inference (`adapter_names`, one name a row). Prompts are left-padded; the
attention mask hides the padding and position ids count only real tokens (cumsum(mask) - 1), so a
padded row computes what it would alone. Rows join the running batch between steps (their prompts
are prefilled, and the KV caches are left-padded to a common length and concatenated) and leave it
when they finish or their client goes away, so no row waits for another.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from lorafit.lora import unwrapped


@dataclass
class Row:
    """One completion being generated: a prompt, its sampling settings, and where its text goes."""

    prompt_ids: list[int]
    adapter: str  # an adapter name, or models.BASE_ADAPTER
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    emit: object = None  # emit(row, text_delta, finish_reason or None); called from the worker thread
    cancelled: bool = False  # set by the request's side when its client goes away
    # worker state
    tokens: list[int] = field(default_factory=list)
    text_sent: int = 0  # characters of the decoded completion already emitted
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Batcher:
    def __init__(self, host, max_batch: int = 64):
        self.host = host  # models.ModelHost: the model, the tokenizer, and the lock around them
        self.max_batch = max_batch
        self.intake: queue.Queue[Row] = queue.Queue()
        self.active: list[Row] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorafit-batcher", daemon=True)
        # the running batch: attention mask (B, T) and the KV cache, row-aligned with self.active
        self._mask: torch.Tensor | None = None
        self._cache = None
        self._can_join = True  # plain (non-sliding) KV caches can be left-padded and concatenated
        self.steps = 0  # forward passes run (a test and the load test read it)
        self.rows_in_step_max = 0

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, row: Row) -> None:
        self.intake.put(row)

    def busy_rows(self, adapter: str | None = None) -> int:
        """Rows waiting or running (for one adapter, or all)."""
        rows = list(self.intake.queue) + list(self.active)
        return sum(1 for r in rows if not r.cancelled and (adapter is None or r.adapter == adapter))

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._stop.is_set():
            newcomers = self._take_newcomers(block=not self.active)
            try:
                with self.host.lock, torch.inference_mode():
                    if newcomers:
                        self._prefill(newcomers)
                    elif self.active:
                        self._decode_step()
            except Exception as exc:  # a bug or out of memory: fail the rows in flight, keep serving
                for row in newcomers + self.active:
                    row.emit(row, None, "error", exc)
                self.active, self._mask, self._cache = [], None, None

    def _take_newcomers(self, block: bool) -> list[Row]:
        rows: list[Row] = []
        if self.active and not self._can_join:
            return rows  # this model's cache cannot take rows mid-flight: they wait for the batch to end
        room = self.max_batch - len(self.active)
        try:
            if block:
                rows.append(self.intake.get(timeout=0.05))
            while len(rows) < room:
                rows.append(self.intake.get_nowait())
        except queue.Empty:
            pass
        return [r for r in rows if not r.cancelled]

    def _forward(self, input_ids, mask, positions, cache, adapters):
        import inspect

        kwargs = {"adapter_names": adapters} if self.host.has_adapters else {}
        # transformers renamed past_key_values to cache (5.x); pass whichever this model takes
        cache_arg = "cache" if "cache" in inspect.signature(unwrapped(self.host.model).forward).parameters else "past_key_values"
        kwargs[cache_arg] = cache
        out = self.host.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs,
        )
        self.steps += 1
        self.rows_in_step_max = max(self.rows_in_step_max, input_ids.shape[0])
        cache = getattr(out, "cache", None)
        return out.logits[:, -1, :].float(), cache if cache is not None else out.past_key_values

    def _prefill(self, rows: list[Row]) -> None:
        device = self.host.device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.host.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.prompt_ids)
            mask[i, width - n :] = 1
            r.generator = torch.Generator(device=device)
            r.generator.manual_seed(r.seed if r.seed is not None else torch.seed())
        ids, mask = ids.to(device), mask.to(device)
        logits, cache = self._forward(ids, mask, positions_of(mask), None, [r.adapter for r in rows])
        self._join(rows, mask, cache)
        self._advance(logits, rows)

    def _join(self, rows: list[Row], mask: torch.Tensor, cache) -> None:
        """Put freshly prefilled rows into the running batch: left-pad mask and cache to one length."""
        if not self.active:
            self.active, self._mask, self._cache = list(rows), mask, cache
            self._can_join = all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._mask = torch.cat([left_pad(self._mask, width), left_pad(mask, width)])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, width, dim=2), left_pad(new.keys, width, dim=2)])
            old.values = torch.cat([left_pad(old.values, width, dim=2), left_pad(new.values, width, dim=2)])
        self.active = self.active + list(rows)

    def _decode_step(self) -> None:
        device = self.host.device
        last = torch.tensor([[r.tokens[-1]] for r in self.active], device=device)
        self._mask = torch.cat([self._mask, torch.ones((len(self.active), 1), dtype=torch.long, device=device)], 1)
        positions = (self._mask.sum(1, keepdim=True) - 1).clamp(min=0)
        logits, self._cache = self._forward(last, self._mask, positions, self._cache, [r.adapter for r in self.active])
        self._advance(logits, self.active)

    def _advance(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Pick each row's next token, emit its new text, then drop the rows that are done."""
        tokenizer = self.host.tokenizer
        for i, r in enumerate(rows):
            if r.cancelled:
                continue
            token = next_token(logits[i], r.temperature, r.top_p, r.generator)
            finish = None
            if token == self.host.eos_id:
                finish = "stop"
            else:
                r.tokens.append(token)
            text = tokenizer.decode(r.tokens, skip_special_tokens=True)
            cut = first_stop(text, r.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
            elif finish is None and len(r.tokens) >= r.max_tokens:
                finish = "length"
            if finish is None:
                # hold back a possible start of a stop string, and a last U+FFFD: an incomplete UTF-8
                # character decodes to one replacement character, which the next bytes may complete
                safe = len(text) - text.endswith("\ufffd")
                safe -= held_back(text[:safe], r.stop)
            else:
                safe = len(text)
            if safe > r.text_sent or finish:
                r.emit(r, text[r.text_sent : safe], finish, None)
                r.text_sent = max(r.text_sent, safe)
            if finish:
                r.cancelled = True  # done: leaves the batch below
        keep = [i for i, r in enumerate(self.active) if not r.cancelled]
        if len(keep) == len(self.active):
            return
        if not keep:
            self.active, self._mask, self._cache = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self.active = [self.active[i] for i in keep]
        self._mask = self._mask[index]
        self._cache.batch_select_indices(index)
        # columns that are padding in every remaining row cost attention for nothing: cut them
        lead = int((self._mask.cumsum(1) == 0).all(0).sum())
        if lead and self._can_join:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: a left-padded row starts at 0 where its text starts."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def left_pad(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling from this row's own generator."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        # the nucleus is a prefix of the tokens by probability; usually a short one, so sort only the top
        # candidates, and all of them only when those do not reach top_p
        for k in (min(256, probs.numel()), probs.numel()):
            top, order = probs.topk(k) if k < probs.numel() else probs.sort(descending=True)
            reach = top.cumsum(0)
            if reach[-1] >= top_p or k == probs.numel():
                break
        keep = int((reach - top < top_p).sum())  # tokens before which the mass is still short of top_p
        probs, order = top[:keep], order[:keep]
    cdf = probs.cumsum(0)
    # one uniform draw a token (inverse CDF): the same distribution as multinomial, a fraction of its cost
    u = torch.rand((), generator=generator, device=cdf.device) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u.reshape(1), right=True)), cdf.numel() - 1)
    return int(order[i]) if order is not None else i


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could begin a stop string (not yet safe to send)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
