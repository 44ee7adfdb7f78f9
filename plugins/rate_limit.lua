-- rate_limit: at most N requests per minute per client (off by default).
--
-- The plugin declares the limit in its `limits` table; gemgate checks and counts it before any
-- `on_request` hook runs, in one-minute windows aligned to the clock. Alone, gemgate counts in
-- memory; in a fleet (GEMGATE_REDIS_URL), in Redis, atomically, so the limit holds across every
-- instance. Past the limit, requests get 429 with Retry-After until the window ends.
--
--   # gemgate.toml:
--   #   [plugins.rate_limit]
--   #   enabled = true
--   #   requests_per_minute = 60
--   #   clients = { batch-job = 600 }
--   for i in $(seq 61); do curl -s -o /dev/null -w '%{http_code}\n' \
--     localhost:8000/v1beta/models/gemini-2.5-flash:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'; done | sort | uniq -c
--   # 60 × 200, 1 × 429
local limits = {}

return {
  name = "rate_limit",
  priority = 200,
  enabled = false,
  schema = { requests_per_minute = "integer", clients = "table" },
  limits = limits,

  init = function(conf)
    local rpm = conf.requests_per_minute or 60
    if rpm < 1 then error("requests_per_minute must be at least 1") end
    limits.per_client_rpm = rpm
    limits.clients = conf.clients or {}
  end,
}
