-- least_loaded: send each request where its model's quota has the most room (off by default).
--
-- Each key in `pool` carries its project's `headroom` for the request's model: from 0 (the
-- project is at a limit of [quota]) to 1 (unused, or no limit). Of `sample` keys taken in turn
-- (a rotating start, so that ties spread), this plugin picks the one with the most headroom,
-- then the fewest requests in flight. It looks at `sample` keys whatever the size of the pool.
-- Keys at their project's limit (`at_limit`) are passed over; gemgate would not send them
-- anyway.
--
--   # gemgate.toml:
--   #   [keys]
--   #   api_keys = [{ key = "AIza…1", project = "p1", tier = "free" }, { key = "AIza…2", project = "p2", tier = "free" }]
--   #   [plugins.least_loaded]
--   #   enabled = true
--   for i in $(seq 6); do curl -s -o /dev/null localhost:8000/v1beta/models/gemini-2.5-flash:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'; done
--   # the two projects take turns: the access log's key= field alternates
local turn
local sample = 8

return {
  name = "least_loaded",
  priority = 20,
  enabled = false,
  schema = { sample = "number" },

  init = function(conf)
    turn = gemgate.counter("turn")
    sample = conf.sample or 8
    if sample < 1 then error("sample must be at least 1") end
  end,

  select_key = function(pool)
    local n = #pool
    if n == 0 then return nil end
    local start = turn:incr() % n
    local best, best_room, best_busy
    for j = 0, math.min(sample, n) - 1 do
      local key = pool[(start + j) % n + 1]
      if not key.at_limit then
        local room, busy = key.headroom, key.in_flight
        if best == nil or room > best_room or (room == best_room and busy < best_busy) then
          best, best_room, best_busy = key, room, busy
        end
      end
    end
    return best and best.id
  end,
}
