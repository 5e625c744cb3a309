"""One base model in memory and the adapters on it, by name; loading goes through lorafit's own
checked loaders (generate.load_inference_base, lora.load_adapter), never a copy of them."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from lorafit.config import ModelConfig
from lorafit.errors import LorafitError
from lorafit.generate import base_load_config, load_inference_base, resolve_adapter_dir
from lorafit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from lorafit.modeling import max_positions

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NameTaken(LorafitError):
    """The name is the base's or an adapter's already loaded."""


def parse_adapter_arg(arg: str) -> tuple[str, str]:
    """`NAME=RUN_DIR` or `RUN_DIR` (named after its directory)."""
    name, sep, path = arg.partition("=")
    if not sep:
        path = arg
        name = Path(arg.rstrip("/")).name
    return name, path


class ModelHost:
    def __init__(self, adapters: list[tuple[str, str]], base: str | None = None, precision: str | None = None,
                 device=None, attn_implementation: str | None = None, trust_remote_code: bool = False,
                 force_base: bool = False):
        if not adapters and not base:
            raise LorafitError("Nothing to serve: give at least one RUN_DIR (or NAME=RUN_DIR), or --base MODEL.")
        dirs = [(name, resolve_adapter_dir(path)) for name, path in adapters]
        # the base as the first adapter's run loaded it (or as given); the others must fit it
        model_cfg = (base_load_config(dirs[0][1], base, attn_implementation, trust_remote_code) if dirs
                     else ModelConfig(name=base, attn_implementation=attn_implementation or "auto",
                                      trust_remote_code=trust_remote_code))
        self.force_base = force_base  # --force-base: adapters (also those loaded at run time) may be of other weights
        self.base_name = model_cfg.name
        self.base_id = Path(self.base_name.rstrip("/")).name or self.base_name  # a local path's last part
        self.model, self.tokenizer = load_inference_base(model_cfg, dirs[0][1] if dirs else None, precision, device)
        self.device = next(self.model.parameters()).device
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id

        self.context = max_positions(self.model)
        self.adapters: dict[str, Path] = {}
        # the worker holds this for each forward pass; loading and unloading change the model's modules
        self.lock = threading.RLock()
        for name, adapter_dir in dirs:
            self.add(name, adapter_dir)

    @property
    def has_adapters(self) -> bool:
        return hasattr(self.model, "peft_config")

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise LorafitError(
                f"Adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."
            )
        if name == self.base_id:
            raise NameTaken(f"Adapter name '{name}' is the base model's name; choose another.")
        if name in self.adapters:
            raise NameTaken(f"An adapter named '{name}' is already loaded; choose another name, or unload it first.")

    def add(self, name: str, adapter_dir: Path) -> None:
        """Load an adapter onto the base under `name` (lorafit's base-signature, key and shape checks)."""
        with self.lock:
            self.check_name(name)
            self.model = load_adapter(self.model, Path(adapter_dir), self.base_name, adapter_name=name,
                                      force_base=self.force_base).eval()
            self.adapters[name] = Path(adapter_dir)

    def remove(self, name: str) -> None:
        with self.lock:
            if len(self.adapters) == 1:
                # PEFT keeps no model without an adapter: take the LoRA layers out, keep the base
                self.model = self.model.unload().eval()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]

    def adapter_for(self, model_id: str) -> str | None:
        """The batcher's adapter name for a request's `model`, or None when no such model is served."""
        if model_id == self.base_id:
            return BASE_ADAPTER
        return model_id if model_id in self.adapters else None


def under_root(path: str, root: Path | None) -> Path:
    """The adapter directory for a runtime load request, only when it lies under --adapters-root
    (symlinks resolved first, so a link cannot lead outside)."""
    if root is None:
        raise PermissionError("Loading adapters at run time is off: start the server with --adapters-root DIR.")
    root = Path(root).resolve()
    given = Path(path)
    candidate = (given if given.is_absolute() else root / given).resolve()
    if not candidate.is_relative_to(root):
        raise PermissionError(f"Path '{path}' is outside --adapters-root; only adapters under the root can be loaded.")
    adapter_dir = resolve_adapter_dir(candidate).resolve()
    for f in (adapter_dir, adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS):
        if not f.resolve().is_relative_to(root):
            raise PermissionError(f"'{path}' links outside --adapters-root ({f.name}); refusing to load it.")
    return adapter_dir
