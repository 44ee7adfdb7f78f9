-- round_robin: each request takes the next usable key in turn (gemini-balance's key choice).
--
-- The turn is a gemgate counter, shared by every worker thread, and rotates over the whole
-- pool in config order; `pool:from(p)` gives the first usable key at or after position p, so
-- keys that are disabled, cooling for this model or already tried by this request are skipped
-- and a retry lands on another key by itself. Remove this file and the built-in choice
-- applies: the first usable key in config order.
--
--   curl -s localhost:8000/v1beta/models/gemini-2.5-flash:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'
--   # the access log's key= field changes from one request to the next
local cursor

return {
  name = "round_robin",
  priority = 10,

  init = function(conf)
    cursor = gemgate.counter("cursor")
  end,

  -- No `ctx` parameter: gemgate then makes no ctx table for the call.
  select_key = function(pool)
    return pool:from(cursor:incr(1)).id
  end,
}
