"""Every local path a config names, checked before anything heavy loads (seconds, not a model load later).

`lorafit train` calls it right after the config is read: a missing data file, a FIFO or a directory given as one, or a
typo in a local model directory is reported at once (templates are checked with the config itself), each problem under its config key, all together.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.config import RunConfig
from lorafit.data.paths import is_local, resolve_path
from lorafit.errors import ConfigError
from lorafit.localpaths import describe_problem, looks_like_a_path, path_problem


def local_path_problems(cfg: RunConfig) -> list[str]:
    problems = []
    d = cfg.data
    if d.root is not None and (why := path_problem(Path(d.root).expanduser(), "dir")):
        problems.append(describe_problem("data.root", Path(d.root).expanduser().absolute(), why, "dir"))
    for name, src in d.sources.items():
        if is_local(src, d.root):
            path = resolve_path(src.path, d.root)
            if why := path_problem(path):
                problems.append(describe_problem(f"data.sources.{name}.path", path.absolute(), why)
                                + (" (relative to data.root)" if d.root and not Path(src.path).is_absolute() else ""))
    if looks_like_a_path(cfg.model.name):
        path = Path(cfg.model.name).expanduser()
        if why := path_problem(path, "dir"):
            problems.append(describe_problem("model.name", path.absolute(), why, "dir")
                            + " (a local model is a directory with config.json; a Hub id looks like gpt2 or org/name)")
    return problems


def check_local_paths(cfg: RunConfig) -> None:
    problems = local_path_problems(cfg)
    if problems:
        raise ConfigError(problems)
