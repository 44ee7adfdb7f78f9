-- round_robin: each request takes the next usable key in turn (gemini-balance's key choice).
--
-- The turn is a gemgate counter, shared by every worker thread. `pool` holds only the keys
-- usable for this attempt (not disabled, not cooling for this model, not yet tried by this
-- request), and `pool:next_id(cursor)` gives the id of the first of them after the key the
-- cursor last gave, in config order: every usable key serves as often as the others, and a
-- retry walks on to the next key. (`pool:next(cursor)` gives the same key as a table, with its
-- health; making it costs more than the id alone.) Remove this file and the built-in choice
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
    return pool:next_id(cursor)
  end,
}
