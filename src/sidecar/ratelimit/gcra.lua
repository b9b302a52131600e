-- Permiso's two-window GCRA, run atomically in Redis: the same arithmetic as
-- crates/core/src/ratelimit.rs (whole microseconds, emission interval = window / quota, a full
-- quota may burst), answering the shared vectors in crates/core/vectors/ratelimit.json alike.
-- Both windows are judged first and committed only if both allow: a refusal consumes nothing.
--
-- KEYS[1]  one hash per service and limits: fields m (minute) and h (hour), theoretical
--          arrival times in microseconds. One key, so it works on Redis Cluster.
-- ARGV[1]  now in microseconds, or "" for Redis' own clock (TIME); only tests pass a time.
-- ARGV[2]  quota per minute, 0 for none
-- ARGV[3]  quota per hour, 0 for none
-- Returns {1, window, remaining, reset_secs} when allowed (window: 1 minute, 2 hour, 0 none)
--      or {0, window, retry_after_secs, wait_us} when refused (wait_us: exactly how long until
--      it would admit, so a sidecar can answer 429 alone until then).

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

-- Integer division of non-negative integers below 2^53: the float quotient, corrected.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceil_secs(us)
  return idiv(us + 999999, 1000000)
end

local fields = { 'm', 'h' }
local lengths = { 60000000, 3600000000 }
local quotas = { tonumber(ARGV[2]), tonumber(ARGV[3]) }
local tats = redis.call('HMGET', KEYS[1], 'm', 'h')

local new_tats = {}
local best_window, best_remaining, best_reset = 0, nil, 0
local refused_window, refused_secs, refused_wait = 0, 0, 0
for i = 1, 2 do
  local q = quotas[i]
  if q > 0 then
    local window = lengths[i]
    local t = idiv(window, q)
    if t < 1 then t = 1 end
    local tat = tonumber(tats[i]) or 0
    local new_tat = math.max(tat, now) + t
    local ahead = new_tat - now
    if ahead > window then
      local wait = new_tat - window - now
      local secs = ceil_secs(wait)
      if secs < 1 then secs = 1 end
      if refused_window == 0 or secs > refused_secs then
        refused_window, refused_secs = i, secs
      end
      if wait > refused_wait then refused_wait = wait end
    else
      new_tats[i] = new_tat
      local remaining = idiv(window - ahead, t)
      -- The tightest window; on equal remainders the first (the minute).
      if best_remaining == nil or remaining < best_remaining then
        best_window, best_remaining, best_reset = i, remaining, ceil_secs(ahead)
      end
    end
  end
end

if refused_window ~= 0 then
  return { 0, refused_window, refused_secs, refused_wait }
end

local ttl = 0
for i = 1, 2 do
  if new_tats[i] ~= nil then
    redis.call('HSET', KEYS[1], fields[i], string.format('%.0f', new_tats[i]))
    if lengths[i] > ttl then ttl = lengths[i] end
  end
end
-- Idle state is worth nothing after its longest window: let Redis drop it.
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], idiv(ttl, 1000) + 1000)
end
return { 1, best_window, best_remaining or 0, best_reset }
