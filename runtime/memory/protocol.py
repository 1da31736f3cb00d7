"""What the memory governor needs from the model manager, and nothing more.

The governor reads the loaded models and, on the ladder's last step or an eviction, asks for
an unload or a runner restart. It never imports the manager: the manager hands itself over as
a :class:`ModelHost` (:meth:`lastmile.runtime.memory.MemoryGovernor.attach`), so the two do
not form an import circle and the governor can be driven by anything with this shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol

if TYPE_CHECKING:
    from lastmile.models.settings import ModelSettings
    from lastmile.runtime.memory.records import ModelMemory
    from lastmile.runtime.shm import BufferPool


class RunnerView(Protocol):
    """One runner process of a model."""

    pid: int | None

    @property
    def alive(self) -> bool: ...

    async def shrink(self) -> None: ...

    async def memory(self, timeout_s: float = 2.0) -> dict[str, Any]: ...


class RunnersView(Protocol):
    """A model's runners (``RunnerPool`` in the manager): iterable, and shrunk together."""

    def __iter__(self) -> Iterator[RunnerView]: ...

    def __len__(self) -> int: ...

    async def shrink(self, timeout_s: float = 5.0) -> None: ...


class BatcherView(Protocol):
    def stats(self) -> dict[str, Any]: ...

    def configure(self, **changes: Any) -> None: ...


class ServedModel(Protocol):
    """A loaded model as the governor sees it (``LoadedModel`` in the manager)."""

    name: str
    state: str
    settings: "ModelSettings"
    memory: "ModelMemory"
    pool: "BufferPool"
    last_used: float

    @property
    def runners(self) -> RunnersView: ...

    @property
    def batcher(self) -> BatcherView | None: ...


class ModelHost(Protocol):
    """The models view and the two actions the governor may take."""

    @property
    def models(self) -> Mapping[str, Any]: ...  # name -> ServedModel

    async def unload(self, name: str, reason: str = ...) -> None: ...

    async def restart_for_memory(self, model: Any) -> None: ...
