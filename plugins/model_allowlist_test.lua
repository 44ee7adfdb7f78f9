-- Tests of model_allowlist.lua (off by default), run alone (`only`), or with model_suffixes
-- for the derived models.
local on = { model_allowlist = { clients = { alice = { "gemini-2.5-flash" } } } }
local only = { "model_allowlist" }

test("a client uses only its models", function()
  local r = run { request = { model = "gemini-2.5-pro", client = "alice" }, plugins = on, only = only }
  expect.denied(r, 403, "alice may not use gemini%-2%.5%-pro")
  r = run { request = { model = "gemini-2.5-flash", client = "alice" }, plugins = on, only = only }
  expect.allowed(r)
end)

test("a client with no entry uses every model, unless there is a default", function()
  local r = run { request = { model = "gemini-2.5-pro", client = "bob" }, plugins = on, only = only }
  expect.allowed(r)
  local strict = { model_allowlist = { default = { "gemini-2.5-flash-lite" } } }
  r = run { request = { model = "gemini-2.5-pro", client = "bob" }, plugins = strict, only = only }
  expect.denied(r, 403)
end)

test("a client's model list shows its models and their derived models", function()
  local r = run {
    request = { model = "", action = "models.list", method = "GET", client = "alice" },
    plugins = on,
    only = { "model_allowlist", "model_suffixes" },
    settings = { search_models = { "gemini-2.5-flash" }, image_models = {}, thinking_models = {} },
    models = { { name = "models/gemini-2.5-flash" }, { name = "models/gemini-2.5-pro" } },
  }
  local names = {}
  for _, m in ipairs(r.models) do names[#names + 1] = m.name end
  expect.eq(names, { "models/gemini-2.5-flash", "models/gemini-2.5-flash-search" })
end)
