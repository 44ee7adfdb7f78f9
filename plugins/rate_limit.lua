-- rate_limit: at most N requests per minute per client (off by default).
--
-- Counts in gemgate's counter store, shared by all worker threads: a fixed one-minute window
-- per client. Past the limit, requests get 429 until the window ends.
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
local limit, per_client = 60, {}

return {
  name = "rate_limit",
  priority = 200,
  enabled = false,
  schema = { requests_per_minute = "integer", clients = "table" },

  init = function(conf)
    limit = conf.requests_per_minute or 60
    per_client = conf.clients or {}
    if limit < 1 then error("requests_per_minute must be at least 1") end
  end,

  on_request = function(req, ctx)
    if req.model == "" then return nil end
    local max = per_client[req.client] or limit
    local used = gemgate.counter("rpm:" .. req.client):incr(1, 60)
    if used > max then
      return gemgate.deny(429, "rate limit: " .. max .. " requests per minute for " .. req.client)
    end
  end,
}
