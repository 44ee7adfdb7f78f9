-- weighted_tags: choose keys at random in proportion to their weight (off by default).
--
-- A key's weight is its `weight` in [keys] api_keys (default 1), times the factor of each of its
-- tags in this plugin's `tags` setting. A tag with factor 0 takes its keys out of rotation
-- while others remain.
--
--   # gemgate.toml:
--   #   [keys]
--   #   api_keys = [{ key = "AIza…1", tags = ["paid"], weight = 1 }, { key = "AIza…2", tags = ["free"] }]
--   #   [plugins.weighted_tags]
--   #   enabled = true
--   #   tags = { paid = 4, free = 1 }
--   for i in $(seq 10); do curl -s -o /dev/null localhost:8000/v1beta/models/gemini-2.5-flash:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'; done
--   # about 8 of 10 requests use the paid key (the access log's key= field)
local factors = {}

local function weight_of(key)
  local w = key.weight
  for _, tag in ipairs(key.tags) do
    local f = factors[tag]
    if f ~= nil then w = w * f end
  end
  return w
end

return {
  name = "weighted_tags",
  priority = 50,
  enabled = false,
  schema = { tags = "table" },

  init = function(conf)
    factors = {}
    for tag, f in pairs(conf.tags or {}) do
      if type(f) ~= "number" or f < 0 then error("tags." .. tag .. " must be a number >= 0") end
      factors[tag] = f
    end
  end,

  select_key = function(pool, ctx)
    local total = 0
    for i = 1, #pool do total = total + weight_of(pool[i]) end
    if total <= 0 then return nil end
    local pick = math.random() * total
    for i = 1, #pool do
      local key = pool[i]
      pick = pick - weight_of(key)
      if pick < 0 then return key.id end
    end
    return pool[#pool].id
  end,
}
