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
  for model, budget in pairs(gemgate.settings.thinking_budget_map) do
    budgets[(model:gsub("^models/", ""))] = budget
  end
  -- With an empty map there is nothing to do: no hook, no cost per request.
  if next(budgets) == nil then plugin.on_request = nil end
end

return plugin
