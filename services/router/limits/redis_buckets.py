"""Per-key token buckets kept in Redis, shared by every router replica that points at the same server.

Same semantics as `InMemoryBuckets`: each bucket holds at most one minute's allowance and refills
continuously at limit/60 per second; `admit` takes 1 request and `tokens` up front or refuses with the
delay after which the same request would pass; `settle` gives back the unused tokens (or takes the
overshoot), never filling a bucket past its capacity.

Atomicity: one Lua script per operation. `admit` reads, refills, checks and takes both buckets of a
key in one script, so two replicas can never both take the last request of a minute. The clock is the
Redis server's `TIME`, so replicas with skewed clocks still agree on the refill.

Storage: a hash per bucket, `autoglm:rl:{<key_id>}:rpm` and `autoglm:rl:{<key_id>}:tpm`, holding
`level`, `stamp` (server seconds) and `cap` (the limit it was built for; a changed limit starts a fresh,
full bucket, as in memory). The braces are a Redis Cluster hash tag: both buckets of a key live in the
same slot. Each write sets a TTL of at least two minutes, longer while the bucket is still below
capacity after that, so an idle key's buckets vanish exactly when a fresh bucket would be identical.

Redis outage: FAIL OPEN by default (`fail_open`, the router's `rate_limit_redis_fail_open`). When
Redis cannot be reached (or answers an error), the request is admitted without a rate limit, a warning
is logged when the outage starts (and an info line when it ends), and
`autoglm_router_rate_limit_fail_open_total{operation}` counts every affected call. This matches the
router's handling of a billing outage for core and interactive traffic: a shared-state store being
down does not take the public API down; budget holds and the concurrency gate still bound the spend
and load. With `fail_open=False` (FAIL CLOSED) an admission Redis cannot check is refused instead with
`RateLimitUnavailable` (UNAVAILABLE, HTTP 503, retryable; batch items wait and retry), counted in
`autoglm_router_rate_limit_fail_closed_total`; a settle that cannot reach Redis is dropped either way
(the bucket keeps the tokens taken up front). Calls time out after `timeout_s` (default 0.5 s) with one
immediate retry, so an unreachable Redis adds at most about a second to a request.
"""

from __future__ import annotations

import structlog
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.router.limits.token_bucket import Admission, RateLimitUnavailable, check_fits, refusal

log = structlog.get_logger(__name__)

FAIL_OPEN = Counter(
    "autoglm_router_rate_limit_fail_open_total",
    "Rate-limit calls let through unchecked because the Redis backend was unreachable",
    ["operation"],
)

FAIL_CLOSED = Counter(
    "autoglm_router_rate_limit_fail_closed_total",
    "Requests refused because the Redis rate-limit backend was unreachable (rate_limit_redis_fail_open: false)",
)

MIN_TTL_MS = 120_000

# Shared by both scripts: the server clock, and reading (with refill) / writing one bucket.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local min_ttl = tonumber(ARGV[#ARGV])

local function level_of(key, cap)
  local v = redis.call('HMGET', key, 'level', 'stamp', 'cap')
  local level, stamp = tonumber(v[1]), tonumber(v[2])
  if level == nil or stamp == nil or tonumber(v[3]) ~= cap then
    return cap, now
  end
  if now > stamp then
    level = math.min(cap, level + (now - stamp) * cap / 60)
    stamp = now
  end
  return level, stamp
end

local function store(key, cap, level, stamp)
  redis.call('HSET', key, 'level', string.format('%.17g', level), 'stamp', string.format('%.17g', stamp),
             'cap', string.format('%d', cap))
  local refill_ms = math.ceil((cap - level) * 60000 / cap)
  redis.call('PEXPIRE', key, math.max(min_ttl, refill_ms + 1000))
end
"""

# KEYS: rpm bucket, tpm bucket. ARGV: rpm, tpm, tokens, min ttl (ms); a limit of 0 is no limit.
# Returns {1} when admitted, else {0, rpm wait s, tpm wait s} (a wait < 0: that bucket has room).
_ADMIT = _PRELUDE + """
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local r_level, r_stamp, t_level, t_stamp
local r_wait, t_wait = -1, -1
if rpm > 0 then
  r_level, r_stamp = level_of(KEYS[1], rpm)
  if r_level < 1 then r_wait = (1 - r_level) * 60 / rpm end
end
if tpm > 0 then
  t_level, t_stamp = level_of(KEYS[2], tpm)
  if t_level < tokens then t_wait = (tokens - t_level) * 60 / tpm end
end
if r_wait >= 0 or t_wait >= 0 then
  return {0, string.format('%.17g', r_wait), string.format('%.17g', t_wait)}
end
if rpm > 0 then store(KEYS[1], rpm, r_level - 1, r_stamp) end
if tpm > 0 then store(KEYS[2], tpm, t_level - tokens, t_stamp) end
return {1}
"""

# KEYS: tpm bucket. ARGV: tpm, tokens given back (negative: the overshoot is taken), min ttl (ms).
_SETTLE = _PRELUDE + """
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local level, stamp = level_of(KEYS[1], tpm)
store(KEYS[1], tpm, math.min(tpm, level + delta), stamp)
return 1
"""


class RedisBuckets:
    """`RateLimiterBackend` over Redis; build it with `from_url` (redis://, rediss:// or unix://)."""

    def __init__(self, client: Redis, *, prefix: str = "autoglm:rl", fail_open: bool = True) -> None:
        self._client = client
        self._prefix = prefix
        self._fail_open = fail_open
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._down = False

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.5, fail_open: bool = True) -> RedisBuckets:
        client = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),  # one immediate retry: a pooled connection cut by a Redis restart
        )
        return cls(client, fail_open=fail_open)

    def _key(self, key_id: str, kind: str) -> str:
        return f"{self._prefix}:{{{key_id}}}:{kind}"

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Admission:
        check_fits(tpm, tokens)
        try:
            reply = await self._admit(
                keys=[self._key(key_id, "rpm"), self._key(key_id, "tpm")],
                args=[max(rpm, 0), max(tpm, 0), tokens, MIN_TTL_MS],
            )
        except (RedisError, OSError) as exc:
            self._failed("admit", exc)
            if not self._fail_open:
                FAIL_CLOSED.inc()
                raise RateLimitUnavailable(
                    "the rate-limit service cannot be reached, so this request cannot be checked against its "
                    "key's limits; try again shortly") from exc
            # Nothing was taken, so nothing is settled later.
            return Admission(key_id=key_id, admitted_tokens=0)
        self._reachable()
        if int(reply[0]) != 1:
            request_wait, token_wait = float(reply[1]), float(reply[2])
            waits: list[tuple[float, str]] = []
            if request_wait >= 0:
                waits.append((request_wait, f"{rpm} requests per minute"))
            if token_wait >= 0:
                waits.append((token_wait, f"{tpm} tokens per minute"))
            raise refusal(waits)
        return Admission(key_id=key_id, admitted_tokens=tokens if tpm else 0)

    async def settle(self, admission: Admission, tpm: int, actual_tokens: int) -> None:
        if not tpm:
            return
        try:
            await self._settle(
                keys=[self._key(admission.key_id, "tpm")],
                args=[tpm, admission.admitted_tokens - actual_tokens, MIN_TTL_MS],
            )
        except (RedisError, OSError) as exc:
            self._failed("settle", exc)
            return
        self._reachable()

    async def close(self) -> None:
        await self._client.aclose()

    def _failed(self, operation: str, exc: Exception) -> None:
        if self._fail_open or operation != "admit":
            FAIL_OPEN.labels(operation).inc()
        if not self._down:
            self._down = True
            log.warning("rate_limit_backend_unreachable", backend="redis", operation=operation,
                        error=f"{type(exc).__name__}: {exc}", fail_open=self._fail_open)

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            log.info("rate_limit_backend_recovered", backend="redis")
