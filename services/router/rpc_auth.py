"""Who may call each RPC of the router: one table of methods, applied once per method as the server registers it.

The table (`RPC_AUTH` in `server.py`) gives every method one kind:
- `ADMIN_TOKEN`: the admin token is checked before the servicer runs (UNAUTHENTICATED otherwise);
- `API_KEY`: the caller's credentials are bound to the call and the servicer reads its principal with
  `principal()` once its size checks have passed (oversized input is refused before anything else, even
  authentication); whatever the servicer does, no message goes back before the caller is authenticated.
  The credentials are checked before the servicer runs (a key memory lacks is looked up on a worker
  thread, so the event loop never waits on the database for it) and the verdict is kept until asked for;
- `NONE`: open (health, reflection).
A method the table does not name is refused (PERMISSION_DENIED), and `check_declared` keeps a server whose
services have an undeclared method from starting.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.common.error_mapping import wrap_handler
from services.common.errors import PermissionDenied
from services.router.types import Principal


class Auth(enum.Enum):
    NONE = "none"
    API_KEY = "API key"
    ADMIN_TOKEN = "admin token"


class Authenticates(Protocol):
    async def aauthenticate(self, authorization: str) -> Principal: ...

    def authenticate_admin(self, authorization: str) -> None: ...


def method_name(service: ServiceDescriptor, method: str) -> str:
    return f"/{service.full_name}/{method}"


def declare(service: ServiceDescriptor, **kinds: Auth) -> dict[str, Auth]:
    """The table's rows for one service: `declare(ROUTER, Generate=Auth.API_KEY, ...)`."""
    unknown = sorted(set(kinds) - {m.name for m in service.methods})
    if unknown:
        raise ValueError(f"{service.full_name} has no method {', '.join(unknown)}")
    return {method_name(service, name): kind for name, kind in kinds.items()}


def open_service(service: ServiceDescriptor) -> dict[str, Auth]:
    """Every method of `service` open (health, reflection)."""
    return {method_name(service, m.name): Auth.NONE for m in service.methods}


def undeclared(table: Mapping[str, Auth], services: Iterable[ServiceDescriptor]) -> list[str]:
    return [method_name(s, m.name) for s in services for m in s.methods if method_name(s, m.name) not in table]


def check_declared(table: Mapping[str, Auth], services: Iterable[ServiceDescriptor]) -> None:
    """Raises unless every method of `services` has a kind in `table`."""
    missing = undeclared(table, services)
    if missing:
        raise RuntimeError(f"methods without a declared authentication: {', '.join(missing)}")


class _Credentials:
    """A call's `authorization`, authenticated once (`check`); the verdict is given when first asked for."""

    def __init__(self, authorization: str, authenticator: Authenticates) -> None:
        self._authorization = authorization
        self._authenticator = authenticator
        self._principal: Principal | None = None
        self._refusal: Exception | None = None

    async def check(self) -> None:
        try:
            self._principal = await self._authenticator.aauthenticate(self._authorization)
        except Exception as refusal:  # kept: raised when the servicer (or the answer) asks who is calling
            self._refusal = refusal

    def principal(self) -> Principal:
        if self._refusal is not None:
            raise self._refusal
        assert self._principal is not None, "the credentials are checked before the servicer runs"
        return self._principal


_bound: ContextVar[_Credentials | None] = ContextVar("router_call_credentials", default=None)


def principal(unbound: Callable[[], Principal]) -> Principal:
    """The caller of the current call, authenticated by the credentials the table bound to it; `unbound`
    gives it for a servicer served without the table (a unit test's)."""
    credentials = _bound.get()
    return credentials.principal() if credentials is not None else unbound()


def _authorization(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


def auth_wrapper(table: Mapping[str, Auth], authenticator: Authenticates
                 ) -> Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]:
    """The handler wrapper that applies `table` (innermost: its refusals pass through the error mapping)."""

    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = table.get(method)
        if kind is Auth.NONE:
            return handler

        def admit(context: grpc.aio.ServicerContext) -> _Credentials | None:
            if kind is None:
                raise PermissionDenied(f"method {method} is not served")
            authorization = _authorization(context)
            if kind is Auth.ADMIN_TOKEN:
                authenticator.authenticate_admin(authorization)
                return None
            return _Credentials(authorization, authenticator)

        def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                credentials = admit(context)
                if credentials is not None:
                    await credentials.check()
                token = _bound.set(credentials)
                try:
                    response = await behavior(request, context)
                    if credentials is not None:
                        credentials.principal()  # the answer leaves only for an authenticated caller
                    return response
                finally:
                    _bound.reset(token)

            return wrapper

        def stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                credentials = admit(context)
                if credentials is not None:
                    await credentials.check()
                _bound.set(credentials)  # each call runs in a task of its own: the binding is this call's
                async for item in behavior(request, context):
                    if credentials is not None:
                        credentials.principal()
                    yield item

            return wrapper

        return wrap_handler(handler, unary, stream)

    return wrap
