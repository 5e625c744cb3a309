"""The request batcher: one worker thread runs every waiting completion row through one decode loop.

Rows for different adapters (or the base, "__base__") share each forward pass through PEFT's
mixed-adapter batch inference (`adapter_names`, one name a row). Prompts are left-padded; the
attention mask hides the padding and position ids count only real tokens (cumsum(mask) - 1), so a
padded row computes what it would alone. Rows join the running batch between steps (their prompts
are prefilled, and the KV caches are left-padded to a common length and concatenated) and leave it
when they finish or their client goes away, so no row waits for another. The cache surgery this
needs lives in kvcache.py (why not `generate`: see there); sampling is transformers' own logits
warpers. A row that cannot go on (its adapter unloaded, its sampling failed) is dropped alone: it
gets finish_reason "error" and the rows beside it carry on.
"""

from __future__ import annotations

import inspect
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from lorafit.errors import LorafitError
from lorafit.lora import unwrapped
from lorafit.serve import kvcache
from lorafit.serve.models import BASE_ADAPTER


class AdapterGone(LorafitError):
    """The row's adapter was unloaded before the row finished."""


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
        self._in_hand: list[Row] = []  # taken from the intake, not yet in the batch (DELETE must see them)
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
        rows = list(self.intake.queue) + list(self._in_hand) + list(self.active)
        # a row just prefilled sits in both _in_hand and active until the step ends: count it once
        distinct = {id(r): r for r in rows}.values()
        return sum(1 for r in distinct if not r.cancelled and (adapter is None or r.adapter == adapter))

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._stop.is_set():
            newcomers = self._in_hand = self._take_newcomers(block=not self.active)
            try:
                with self.host.lock, torch.inference_mode():
                    # under the lock: adapters cannot change until this step's forward is done
                    newcomers = [r for r in newcomers if self._adapter_loaded(r)]
                    for r in self.active:
                        self._adapter_loaded(r)
                    self._drop_finished()
                    if newcomers:
                        self._prefill(newcomers)
                    elif self.active:
                        self._decode_step()
            except Exception as exc:  # a bug or out of memory: fail the rows in flight, keep serving
                for row in newcomers + self.active:
                    row.emit(row, None, "error", exc)
                self.active, self._mask, self._cache = [], None, None
            finally:
                self._in_hand = []

    def _adapter_loaded(self, row: Row) -> bool:
        """False (and the row answered alone) when its adapter is no longer loaded."""
        if row.cancelled or row.adapter == BASE_ADAPTER or row.adapter in self.host.adapters:
            return not row.cancelled
        row.cancelled = True
        row.emit(row, None, "error", AdapterGone(f"adapter '{row.adapter}' was unloaded"))
        return False

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
            self._can_join = kvcache.can_join(cache)
            return
        self._mask = kvcache.join(self._cache, self._mask, cache, mask)
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
            try:
                token = next_token(logits[i], r.temperature, r.top_p, r.generator)
            except Exception as exc:  # this row's sampling alone: it leaves, the others go on
                r.cancelled = True
                r.emit(r, None, "error", exc)
                continue
            finish = None
            if token == self.host.eos_id:
                finish = "stop"
            else:
                r.tokens.append(token)
            text = tokenizer.decode(r.tokens, skip_special_tokens=True)
            # a stop string can only begin in the text not yet sent (held_back kept its start), so only
            # that tail is searched: the cost stays bounded by the stop strings' (capped) length
            cut = first_stop(text, r.stop, start=max(0, r.text_sent - 1))
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
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Take finished, cancelled and dropped rows out of the running batch."""
        keep = [i for i, r in enumerate(self.active) if not r.cancelled]
        if len(keep) == len(self.active):
            return
        if not keep:
            self.active, self._mask, self._cache = [], None, None
            return
        self.active = [self.active[i] for i in keep]
        self._mask = kvcache.keep_rows(self._cache, self._mask, keep)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: a left-padded row starts at 0 where its text starts."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise transformers' temperature and top-p warpers, then one draw
    from this row's own generator."""
    if temperature <= 0:
        return int(logits.argmax())
    # shifted so the top logit is 0: softmax is unchanged, and a tiny temperature (1e-40) cannot
    # overflow to inf (inf - inf = nan); it tends to greedy, as it should
    scores = (logits - logits.max()).unsqueeze(0)
    scores = TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
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
