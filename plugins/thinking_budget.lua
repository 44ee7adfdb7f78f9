-- thinking_budget: THINKING_BUDGET_MAP ([models] thinking_budget_map) sets
-- generationConfig.thinkingConfig.thinkingBudget per model, unless the client set one.
--
--   THINKING_BUDGET_MAP='{"gemini-2.5-flash": 1024}' gemgate &
--   curl -s localhost:8000/v1beta/models/gemini-2.5-flash:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'
--   # Google receives "generationConfig": {"thinkingConfig": {"thinkingBudget": 1024}}
local budgets = {}

local plugin = {
  name = "thinking_budget",
  priority = 90,
}

function plugin.on_request(req, ctx)
  local budget = budgets[req.model]
  if budget == nil then return nil end
  return gemgate.rewrite {
    generation_config_defaults = { thinkingConfig = { thinkingBudget = budget } },
  }
end

function plugin.init(conf)
  budgets = {}
  -- Only calls to the mapped models reach on_request (none with an empty map).
  plugin.models = {}
  for model, budget in pairs(gemgate.settings.thinking_budget_map) do
    local name = model:gsub("^models/", "")
    budgets[name] = budget
    plugin.models[#plugin.models + 1] = name
  end
end

return plugin
