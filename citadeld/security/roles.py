"""Which role each route needs: the config's rules resolved once per route at start-up, so the
per-request check is one dict lookup and one integer comparison."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from citadeld.security.config import ROLES, AuthConfig, RoleRule

log = logging.getLogger("citadeld.security")

#: rank of each role; a principal passes when its rank >= the route's
RANK: dict[str, int] = {name: i + 1 for i, name in enumerate(ROLES)}
OPEN = 0  # no credential needed
ADMIN = RANK["admin"]


def rank_of(role: str) -> int:
    """0 for anonymous or an unknown role: such a principal passes open routes only."""
    return RANK.get(role, 0)


@dataclass(frozen=True, slots=True)
class Requirement:
    rank: int  # OPEN, or RANK[role]
    rule: RoleRule | None  # None: no rule matched (fail closed: admin only)

    @property
    def role(self) -> str:
        return "open" if self.rank == OPEN else ROLES[self.rank - 1]


UNMAPPED = Requirement(ADMIN, None)
#: no route matched (404/405): any authenticated caller learns that, nobody else does
NO_ROUTE = Requirement(RANK["user"], None)


def canonical(route: AbstractRoute) -> str | None:
    resource = route.resource
    return resource.canonical if resource is not None else None


class Policy:
    """Route -> Requirement, built from the app's router and ``auth`` config."""

    def __init__(self, cfg: AuthConfig) -> None:
        self.cfg = cfg
        self.rules: tuple[RoleRule, ...] = (*cfg.extra_rules, *cfg.rules)
        self._by_route: dict[AbstractRoute, Requirement] = {}

    def decide(self, method: str, path: str) -> Requirement:
        """The requirement for a canonical route path; open_routes win over rules."""
        if any(fnmatch.fnmatchcase(path, p) for p in self.cfg.open_routes):
            return Requirement(OPEN, None)
        for rule in self.rules:
            if rule.matches(method, path):
                return Requirement(OPEN if rule.role == "open" else RANK[rule.role], rule)
        return UNMAPPED

    def bind(self, app: web.Application) -> list[str]:
        """Resolve every route of the app; returns the unmapped ones (they need admin)."""
        unmapped = []
        for route in app.router.routes():
            path = canonical(route)
            if path is None:
                continue
            req = self.decide(route.method, path)
            self._by_route[route] = req
            if req is UNMAPPED:
                unmapped.append(f"{route.method} {path}")
        if unmapped:
            log.warning("routes without a role rule: admin only until auth.rules names them",
                        extra={"routes": unmapped})
        return unmapped

    def requirement(self, route: AbstractRoute) -> Requirement:
        req = self._by_route.get(route)
        if req is None:
            path = canonical(route)
            if path is None:  # 404/405: aiohttp makes a new system route per request
                return NO_ROUTE
            req = self._by_route[route] = self.decide(route.method, path)  # added late
        return req
