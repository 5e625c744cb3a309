"""Which process this is (rank, world size), with no torch: the console asks it before torch loads, and
`distributed.init` sets it once the process group is joined."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def set_world(found: World) -> None:
    global _world
    _world = found


def from_environment() -> World:
    """The world torchrun / accelerate launch describe in the environment (one process without them)."""
    env = os.environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return World()
    return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
