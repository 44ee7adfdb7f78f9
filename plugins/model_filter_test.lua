-- Tests of model_filter.lua (FILTERED_MODELS).
-- This plugin alone (`only`): whatever else the config enables, the tests hold.
local settings = { filtered_models = { "gemini-1.5-pro" } }
local only = { "model_filter" }

test("a filtered model is refused with 404", function()
  local r = run { request = { model = "gemini-1.5-pro" }, settings = settings, only = only }
  expect.denied(r, 404, "FILTERED_MODELS")
  expect.eq(r.key, nil, "no key is chosen for a refused request")
end)

test("a filtered model's derived models are refused too", function()
  local r = run { request = { model = "gemini-1.5-pro-search" }, settings = settings, only = only }
  expect.denied(r, 404)
end)

test("other models pass", function()
  local r = run { request = { model = "gemini-2.5-flash" }, settings = settings, only = only }
  expect.allowed(r)
  expect.key(r, "k1")
end)

test("model lists leave filtered models out", function()
  local r = run {
    request = { model = "", action = "models.list", method = "GET" },
    settings = settings,
    only = only,
    models = { { name = "models/gemini-1.5-pro" }, { name = "models/gemini-2.5-flash" } },
  }
  expect.eq(r.models, { { name = "models/gemini-2.5-flash" } })
end)
