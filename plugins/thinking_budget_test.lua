-- Tests of thinking_budget.lua (THINKING_BUDGET_MAP), run alone.
local settings = { thinking_budget_map = { ["gemini-2.5-flash"] = 1024 } }
local only = { "thinking_budget" }

test("a mapped model gets its budget by default", function()
  local r = run { request = { body = { contents = {} } }, settings = settings, only = only }
  expect.eq(r.body.generationConfig.thinkingConfig.thinkingBudget, 1024)
end)

test("the client's own budget wins", function()
  local body = { generationConfig = { thinkingConfig = { thinkingBudget = 64 } } }
  local r = run { request = { body = body }, settings = settings, only = only }
  expect.eq(r.body.generationConfig.thinkingConfig.thinkingBudget, 64)
end)

test("other models are left alone", function()
  local r = run { request = { model = "gemini-2.5-pro", body = {} }, settings = settings, only = only }
  expect.eq(r.body, {})
  expect.eq(r.rewrite, nil)
end)
