"""Name -> class registries: the plug-in points of the library.

A new projector, scoring method, feature computer, output function or model family is added by
writing a class (or function) and decorating it with its registry's ``register``; nothing else
is edited. Lookups by an unknown name fail with the list of known names.

    PROJECTORS = Registry("projector")

    @PROJECTORS.register("sjlt")
    class SparseProjector(Projector): ...

    PROJECTORS.get("sjlt")  # -> SparseProjector
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered mapping name -> entry with a clear error for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` adds the class or function under ``name``."""
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered already ({self._entries[name]!r})")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry put the registry back)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}") from None

    def __getitem__(self, name: str) -> T:
        """``REGISTRY[name]``, the same as :meth:`get`: callers index the registries like the dicts they replaced."""
        return self.get(name)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
