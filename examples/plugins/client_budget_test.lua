-- Tests of client_budget.lua: `gemgate plugin test examples/plugins`. Each runs the plugin
-- alone (`only`) with the settings it names: whatever the config enables or sets, they hold.
local conf = { client_budget = { per_day = 3, clients = { batch = 5 } } }
local only = { "client_budget" }

test("a client's calls within its budget go through", function()
  local r = run { request = { model = "gemini-2.5-pro", client = "alice" }, plugins = conf, only = only, times = 3 }
  expect.allowed(r)
  expect.eq(r.model, "gemini-2.5-pro")
end)

test("the call past the budget is refused with 429", function()
  local r = run { request = { model = "gemini-2.5-pro", client = "alice" }, plugins = conf, only = only, times = 4 }
  expect.denied(r, 429, "used its 3 calls")
end)

test("a client may have a budget of its own", function()
  local r = run { request = { model = "gemini-2.5-pro", client = "batch" }, plugins = conf, only = only, times = 5 }
  expect.allowed(r)
  r = run { request = { model = "gemini-2.5-pro", client = "batch" }, plugins = conf, only = only, times = 6 }
  expect.denied(r, 429)
end)

test("other models are not counted", function()
  local r = run { request = { model = "gemini-2.5-flash", client = "alice" }, plugins = conf, only = only, times = 10 }
  expect.allowed(r)
  for _, step in ipairs(r.trace.steps) do expect.ne(step.plugin, "client_budget") end
end)

test("a budget below 0 is refused when the plugin loads", function()
  expect.error(function()
    run { plugins = { client_budget = { per_day = -1 } }, only = only }
  end, "per_day must be 0 or more")
end)
