"""The admin command registry: how any module adds a `citadelctl` command.

A command is a name of one or more words (``"breakers open"``), a handler, and how to call it::

    from citadeld.admin import AdminContext, Param, command

    @command("breakers open", mutating=True, help="force a server's breaker open",
             params=[Param("server", help="LLM server name")])
    async def breakers_open(ctx: AdminContext, args: dict[str, Any]) -> Any:
        router = ctx.state.extra["router"]
        ...
        return {"server": args["server"], "state": "open"}

or, without the decorator, ``register("breakers open", handler, mutating=True, ...)``.
Handlers run on the daemon's event loop: they may be sync or async, must never block (bridge to
actors with :mod:`citadeld.bridge`), and answer JSON-able data; raise ``AdminError`` to fail.
``mutating=True`` commands run only when the caller confirmed (``citadelctl ... --yes``).
Registration happens at import time; the module must be imported before the daemon starts (the
built-in ones are imported by :mod:`citadeld.admin.server`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from citadeld.admin.protocol import UNKNOWN_COMMAND, USAGE, AdminError

if TYPE_CHECKING:
    from citadeld.admin.lifecycle import Lifecycle
    from citadeld.state import DaemonState

Handler = Callable[["AdminContext", dict[str, Any]], Awaitable[Any] | Any]

_WORD = re.compile(r"^[a-z][a-z0-9-]*$")
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Param:
    """A positional parameter of a command, in order."""

    name: str
    help: str = ""
    choices: tuple[str, ...] | None = None
    optional: bool = False

    def synopsis(self) -> str:
        text = self.name.upper() if self.choices is None else "|".join(self.choices)
        return f"[{text}]" if self.optional else text


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler = field(repr=False)
    help: str = ""
    mutating: bool = False
    params: tuple[Param, ...] = ()
    timeout: float | None = None  # None: the daemon's admin.timeout_s
    ask: str | None = None  # a question citadelctl asks on a terminal when --yes is missing

    @property
    def words(self) -> list[str]:
        return self.name.split()

    def synopsis(self) -> str:
        return " ".join([self.name, *(p.synopsis() for p in self.params)])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "synopsis": self.synopsis(),
            "help": self.help,
            "mutating": self.mutating,
            "params": [
                {"name": p.name, "help": p.help, "choices": p.choices, "optional": p.optional}
                for p in self.params
            ],
        }

    def bind(self, positional: Sequence[str], named: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        """Map positional words and named args onto the parameters; raise usage errors."""
        named = dict(named or {})
        if len(positional) > len(self.params):
            extra = " ".join(positional[len(self.params):])
            raise AdminError(f"{self.name}: unexpected argument {extra!r}; usage: "
                             f"{self.synopsis()}", USAGE)
        args: dict[str, Any] = {}
        for i, param in enumerate(self.params):
            if i < len(positional):
                value: Any = positional[i]
            elif param.name in named:
                value = named.pop(param.name)
            elif param.optional:
                continue
            else:
                raise AdminError(f"{self.name}: missing {param.name.upper()}; usage: "
                                 f"{self.synopsis()}", USAGE)
            if param.choices is not None and value not in param.choices:
                raise AdminError(f"{self.name}: {param.name} must be one of "
                                 f"{', '.join(param.choices)} (got {value!r})", USAGE)
            args[param.name] = value
        if named:
            raise AdminError(f"{self.name}: unknown argument(s) {sorted(named)}", USAGE)
        return args


@dataclass
class AdminContext:
    """What a handler may reach: the daemon's state, its lifecycle (reload, drain), the caller."""

    state: DaemonState
    lifecycle: Lifecycle | None
    registry: Registry
    peer: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        mutating: bool = False,
        help: str = "",
        params: Iterable[Param | str] = (),
        timeout: float | None = None,
        ask: str | None = None,
        replace: bool = False,
    ) -> Command:
        words = name.split()
        if not words or not all(_WORD.match(w) for w in words):
            raise ValueError(f"bad admin command name {name!r}: lower-case words [a-z0-9-]")
        name = " ".join(words)
        if name in self._commands and not replace:
            raise ValueError(f"admin command {name!r} is already registered")
        if not callable(handler):
            raise TypeError("handler must be callable")
        ps = tuple(Param(p) if isinstance(p, str) else p for p in params)
        cmd = Command(name, handler, help or (inspect.getdoc(handler) or "").split("\n")[0],
                      mutating, ps, timeout, ask)
        self._commands[name] = cmd
        return cmd

    def command(self, name: str, **kw: Any) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`; returns the handler unchanged."""
        def deco(handler: Handler) -> Handler:
            self.register(name, handler, **kw)
            return handler
        return deco

    def unregister(self, name: str) -> None:
        self._commands.pop(name, None)

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def all(self) -> list[Command]:
        return [self._commands[k] for k in sorted(self._commands)]

    def resolve(self, words: Sequence[str]) -> tuple[Command, list[str]]:
        """The command whose name is the longest prefix of `words`, and the words left over."""
        words = [str(w) for w in words]
        for n in range(len(words), 0, -1):
            cmd = self._commands.get(" ".join(words[:n]))
            if cmd is not None:
                return cmd, words[n:]
        prefix = " ".join(words[:1])
        subs = sorted(c.name for c in self._commands.values() if c.words[0] == prefix)
        if words and subs:
            raise AdminError(f"{' '.join(words)}: choose one of: {', '.join(subs)}", USAGE,
                             candidates=subs)
        raise AdminError(f"unknown command {' '.join(words)!r}; `citadelctl help` lists them",
                         UNKNOWN_COMMAND)


REGISTRY = Registry()


def register(name: str, handler: Handler, **kw: Any) -> Command:
    """Register a command in the daemon's registry (see the module doc)."""
    return REGISTRY.register(name, handler, **kw)


def command(name: str, **kw: Any) -> Callable[[Handler], Handler]:
    """Decorator: register the function as the handler of admin command `name`."""
    return REGISTRY.command(name, **kw)
