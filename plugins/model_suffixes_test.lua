-- Tests of model_suffixes.lua (the -search, -image and -non-thinking models), run alone.
local settings = { search_models = { "gemini-2.5-flash" }, image_models = { "gemini-2.0-flash-exp" } }
local only = { "model_suffixes" }

test("-search adds Google Search to the base model", function()
  local r = run {
    request = { model = "gemini-2.5-flash-search", body = { contents = {} } },
    settings = settings,
    only = only,
  }
  expect.eq(r.model, "gemini-2.5-flash")
  expect.eq(r.body.tools, { { googleSearch = {} } })
end)

test("-search is only for the models SEARCH_MODELS lists", function()
  local r = run { request = { model = "gemini-2.5-pro-search" }, settings = settings, only = only }
  expect.eq(r.model, "gemini-2.5-pro-search")
end)

test("-image asks for images", function()
  local r = run { request = { model = "gemini-2.0-flash-exp-image", body = {} }, settings = settings, only = only }
  expect.eq(r.model, "gemini-2.0-flash-exp")
  expect.eq(r.body.generationConfig.responseModalities, { "Text", "Image" })
end)

test("-non-thinking sets the thinking budget to 0, over the client's", function()
  local body = { generationConfig = { thinkingConfig = { thinkingBudget = 512 } } }
  local r = run { request = { model = "gemini-2.5-flash-non-thinking", body = body }, only = only }
  expect.eq(r.model, "gemini-2.5-flash")
  expect.eq(r.body.generationConfig.thinkingConfig.thinkingBudget, 0)
end)
