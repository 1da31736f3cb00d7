"""The errors the model room raises, in one place so ``manifest``, ``formats`` and ``store``
can share them without importing each other in circles.

Each message is written for the operator: it names the file and the key (or the rule) and says
what would be accepted, so it can be shown as is by the CLI, the TUI and the HTTP API.
"""

from __future__ import annotations

from pathlib import Path


class ManifestError(ValueError):
    """A model folder's description is wrong or incomplete.

    ``file`` is the ``model.toml`` (or the model folder when there is none), ``key`` the
    dotted key inside it (``inputs[0].datatype``, ``settings.max_batch_size``; empty when the
    problem is the file as a whole) and ``message`` the reason, with what is allowed.
    """

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = Path(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


class StoreEscapeError(ManifestError):
    """A model folder or artifact resolves (through a symlink or ``..``) outside the place it
    must stay in. Refused because the store is the boundary an operator reviews: a link out of
    it would let a model name reach any file the daemon can read."""


class InvalidModelName(ValueError):
    """A model name breaks the naming rule (see ``lastmile.models.store.NAME_RULE``)."""

    def __init__(self, name: object, rule: str) -> None:
        self.name = name
        super().__init__(f"invalid model name {name!r}: {rule}")


class ModelNotFoundError(KeyError):
    """No folder of that name in the store. A ``KeyError`` so ``store.get`` reads like a
    mapping lookup; ``__str__`` is overridden because ``KeyError`` would quote the message."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.message = f"model {name!r} not found in the model store {root}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class FormatError(ValueError):
    """The format of a model folder could not be told from its files (nothing recognisable,
    or more than one candidate). The message lists what was found."""
