"""The life of a model version: DRAFT → PENDING_APPROVAL → ACTIVE → DEPRECATED → RETIRED.

What each state serves:

| state            | unpinned traffic (a split) | requests pinned to it (`model@version`)          |
|------------------|----------------------------|--------------------------------------------------|
| DRAFT            | no                         | no (FAILED_PRECONDITION naming the state)        |
| PENDING_APPROVAL | no                         | no (FAILED_PRECONDITION naming the state)        |
| ACTIVE           | yes, by its weight         | yes                                              |
| DEPRECATED       | no                         | yes, with a deprecation signal                   |
| RETIRED          | no                         | no (FAILED_PRECONDITION naming the state)        |

The moves an operator may make (`MOVES`); any other is refused with FAILED_PRECONDITION naming the
current state. A canary rollback is the move ACTIVE → PENDING_APPROVAL. RETIRED is final.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import FailedPrecondition, InvalidInput


class VersionState(enum.IntEnum):  # the numbers of autoglm.router.v1.VersionState
    DRAFT = 1
    PENDING_APPROVAL = 2
    ACTIVE = 3
    DEPRECATED = 4
    RETIRED = 5


D, P, A, DEP, R = (VersionState.DRAFT, VersionState.PENDING_APPROVAL, VersionState.ACTIVE,
                   VersionState.DEPRECATED, VersionState.RETIRED)

MOVES: dict[VersionState, frozenset[VersionState]] = {
    D: frozenset({P, R}),  # submitted for approval, or abandoned
    P: frozenset({A, D, R}),  # approved, sent back for rework, or abandoned
    A: frozenset({DEP, P}),  # deprecated, or withdrawn for approval again (what a canary rollback does)
    DEP: frozenset({A, R}),  # reinstated, or retired
    R: frozenset(),
}

# The states a version may be registered in (RegisterModelVersion's initial_state).
INITIAL = frozenset({D, P, A})
# Traffic an unpinned request may be split to; states a pinned request is served in.
SPLITTABLE = frozenset({A})
PINNABLE = frozenset({A, DEP})
MAX_REASON = 1024
MAX_ACTOR = 128


@dataclass(frozen=True)
class StateChange:
    """One move of one version, as recorded in its history."""

    time: datetime
    model: str
    version: str
    from_state: VersionState | None  # None: the state it was registered in
    to_state: VersionState
    actor: str
    reason: str


def parse(name: str) -> VersionState:
    try:
        return VersionState[name.upper()]
    except KeyError:
        known = ", ".join(s.name for s in VersionState)
        raise InvalidInput(f"unknown version state {name!r} (one of {known})", field="state") from None


def check_move(target: str, current: VersionState, wanted: VersionState) -> None:
    """Raises FailedPrecondition unless `current` → `wanted` is an allowed move of `target` ("m@v")."""
    if wanted in MOVES[current]:
        return
    allowed = ", ".join(sorted(s.name for s in MOVES[current])) or "none: RETIRED is final"
    raise FailedPrecondition(f"version {target} is {current.name}: it cannot move to {wanted.name} "
                             f"(from {current.name}: {allowed})", field="state")


def check_initial(state: VersionState) -> None:
    if state not in INITIAL:
        allowed = ", ".join(sorted(s.name for s in INITIAL))
        raise InvalidInput(f"initial_state: a version is registered as {allowed}, not {state.name}",
                           field="initial_state")


def check_operator(actor: str, reason: str) -> None:
    """Every move names who made it and why."""
    if not actor.strip() or len(actor) > MAX_ACTOR:
        raise InvalidInput(f"operator is required (who makes the change, at most {MAX_ACTOR} characters)",
                           field="operator")
    if not reason.strip() or len(reason) > MAX_REASON:
        raise InvalidInput(f"reason is required (why the version moves, at most {MAX_REASON} characters)",
                           field="reason")


def refuse_unserved(target: str, state: VersionState, pinned: bool) -> None:
    """Raises FailedPrecondition when a version in `state` may not serve this request."""
    if pinned and state in PINNABLE:
        return
    if not pinned and state in SPLITTABLE:
        return
    reason = f"VERSION_{state.name}"
    if pinned:
        raise FailedPrecondition(f"version {target} is {state.name} and serves no requests; call the model "
                                 "without '@version', or pin an ACTIVE version", field="model", reason=reason)
    raise FailedPrecondition(f"model {target.partition('@')[0]!r} has no ACTIVE version to serve it "
                             f"({target} is {state.name})", field="model", reason=reason)


@dataclass(frozen=True)
class Deprecation:
    """The signal a request pinned to a DEPRECATED version gets."""

    target: str  # "name@version"
    since: datetime | None  # when it was deprecated (None: not recorded)

    @property
    def notice(self) -> str:
        """What to tell the caller (ASCII: it travels in gRPC metadata)."""
        when = f" since {self.since.isoformat(timespec='seconds')}" if self.since is not None else ""
        return (f"{self.target} is DEPRECATED{when}: it serves only requests pinned to it and will be retired; "
                f"call {self.target.partition('@')[0]} without '@version' to get an ACTIVE version")
