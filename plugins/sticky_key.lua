-- sticky_key: each client keeps one key while that key is healthy (off by default).
--
-- Rendezvous hashing over the usable keys: a client's key is the one with the highest
-- hash(client, key id). When it cools down or is disabled, the client moves to its next-best
-- key, and comes back when the key recovers; other clients are not moved. No state is kept.
--
--   # gemgate.toml:  [plugins.sticky_key]
--   #                enabled = true
--   for i in 1 2 3; do curl -s -o /dev/null localhost:8000/v1beta/models/gemini-2.5-flash:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'; done
--   # the access log shows the same key= for all three
return {
  name = "sticky_key",
  priority = 60,
  enabled = false,

  select_key = function(pool, ctx)
    local best, best_score = nil, -1
    for i = 1, #pool do
      local key = pool[i]
      local score = gemgate.hash(ctx.client .. "\0" .. key.id)
      if score > best_score then best, best_score = key.id, score end
    end
    return best
  end,
}
