-- model_filter: FILTERED_MODELS ([models] filtered) are hidden from model lists and refused.
--
-- A derived model (`<m>-search`, `<m>-image`, `<m>-non-thinking`) is filtered with its base.
--
--   FILTERED_MODELS='["gemini-1.5-pro"]' gemgate &
--   curl -s localhost:8000/v1beta/models/gemini-1.5-pro:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'
--   # → 404 "models/gemini-1.5-pro is not available through this gateway"
local filtered = {}
local find, sub = string.find, string.sub
local SUFFIXES = { "-search", "-image", "-non-thinking" }

local function base_of(model)
  for _, suffix in ipairs(SUFFIXES) do
    if find(model, suffix, -#suffix, true) then return sub(model, 1, -#suffix - 1) end
  end
  return model
end

local function is_filtered(model)
  return filtered[model] or filtered[base_of(model)] or false
end

local plugin
plugin = {
  name = "model_filter",
  -- Runs after model_suffixes: it sees the derived models that one adds to the list.
  priority = 50,

  init = function(conf)
    filtered = {}
    for _, m in ipairs(gemgate.settings.filtered_models) do filtered[m] = true end
    -- Nothing filtered: no hooks, no cost per request.
    if next(filtered) == nil then
      plugin.on_request, plugin.filter_models = nil, nil
    end
  end,

  on_request = function(req, ctx)
    if req.model == "" then return nil end
    if is_filtered(req.requested_model) or is_filtered(req.model) then
      return gemgate.deny(404, "models/" .. req.requested_model ..
        " is not available through this gateway (FILTERED_MODELS)")
    end
  end,

  filter_models = function(models, ctx)
    local kept = {}
    for _, m in ipairs(models) do
      local name = (m.name or ""):gsub("^models/", "")
      if not is_filtered(name) then kept[#kept + 1] = m end
    end
    return kept
  end,
}

return plugin
