-- Tests of model_alias.lua: `gemgate plugin test` runs them (see README.md, "The loop").
-- Each runs this plugin alone (`only`), with the aliases it names: whatever else the config
-- enables or sets, the tests hold.
local aliases = { ["gpt-4o"] = "gemini-2.5-flash", ["claude-*"] = "gemini-2.5-pro" }
local only = { "model_alias" }

test("an exact alias is sent as its model", function()
  local r = run { request = { model = "gpt-4o" }, settings = { model_aliases = aliases }, only = only }
  expect.allowed(r)
  expect.eq(r.model, "gemini-2.5-flash")
  expect.eq(r.rewrite.model, "gemini-2.5-flash")
end)

test("a pattern alias takes every model it matches", function()
  local r = run { request = { model = "claude-sonnet-4" }, settings = { model_aliases = aliases }, only = only }
  expect.eq(r.model, "gemini-2.5-pro")
end)

test("a model that is no alias is left alone", function()
  local r = run { request = { model = "gemini-2.5-flash-lite" }, settings = { model_aliases = aliases }, only = only }
  expect.eq(r.model, "gemini-2.5-flash-lite")
  expect.eq(r.rewrite, nil)
end)

test("without aliases the plugin has no hook at all", function()
  local r = run { request = { model = "gpt-4o" }, settings = { model_aliases = {} }, only = only }
  expect.eq(r.model, "gpt-4o")
  for _, step in ipairs(r.trace.steps) do expect.ne(step.plugin, "model_alias") end
end)

test("an exact alias is listed beside its model", function()
  local r = run {
    request = { model = "", action = "models.list", method = "GET" },
    settings = { model_aliases = aliases },
    only = only,
    models = { { name = "models/gemini-2.5-flash", displayName = "Gemini 2.5 Flash" } },
  }
  expect.eq(#r.models, 2)
  expect.eq(r.models[2].name, "models/gpt-4o")
  expect.eq(r.models[2].displayName, "gpt-4o (Gemini 2.5 Flash)")
end)
