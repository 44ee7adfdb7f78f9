-- client_budget: each client may make a number of calls a day to the costly models; past its
-- budget, those calls are refused with 429 (other models are not counted). The worked example
-- of plugins/README.md ("The loop"): copy this file and client_budget_test.lua into plugins/.
--
--   # gemgate.toml:
--   #   [plugins.client_budget]
--   #   models = ["gemini-2.5-pro*"]       # the costly models (the default)
--   #   per_day = 200                      # each client's budget (the default: 100)
--   #   clients = { nightly-batch = 2000 } # clients with a budget of their own
--
-- The count is this instance's (gemgate.counter): in a fleet, give each instance its share.
local per_day, clients = 100, {}

local plugin
plugin = {
  name = "client_budget",
  priority = 150,
  schema = { models = "list", per_day = "integer", clients = "table" },

  init = function(conf)
    per_day = conf.per_day or 100
    if per_day < 0 then error("per_day must be 0 or more") end
    clients = {}
    for client, n in pairs(conf.clients or {}) do
      if math.type(n) ~= "integer" or n < 0 then
        error("clients." .. client .. " must be a whole number, 0 or more")
      end
      clients[client] = n
    end
    -- Only calls of these models reach on_request: the others cost nothing here.
    plugin.models = conf.models or { "gemini-2.5-pro*" }
  end,

  on_request = function(req, ctx)
    local budget = clients[req.client] or per_day
    local used = gemgate.counter("day:" .. req.client):incr(1, 86400)
    if used > budget then
      return gemgate.deny(429, "client " .. req.client .. " has used its " .. budget ..
        " calls of " .. req.model .. " for today")
    end
  end,
}

return plugin
