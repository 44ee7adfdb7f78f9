-- model_alias: MODEL_ALIASES ([models] aliases) gives models other names, for clients that
-- ask for models by names they know (an OpenAI or Anthropic client's `gpt-4o`,
-- `claude-sonnet-4-5`). `*` stands for any run of characters; an exact name wins over a
-- pattern, and a longer pattern over a shorter one. It runs first, so every other plugin sees
-- the Gemini model; the logs keep the name the client asked for.
--
--   MODEL_ALIASES='{"gpt-4o": "gemini-2.5-flash", "claude-*": "gemini-2.5-pro"}' gemgate &
--   curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $TOKEN" \
--     -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
--   # Google receives a call to gemini-2.5-flash; model lists show gpt-4o beside it
local exact, patterns = {}, {}
local find, gsub = string.find, string.gsub

-- A `*` pattern as a Lua pattern anchored at both ends, every other character literal.
local function lua_pattern(alias)
  local escaped = gsub(alias, "[%^%$%(%)%%%.%[%]%+%-%?]", "%%%0")
  return "^" .. gsub(escaped, "%*", ".*") .. "$"
end

local function target_of(model)
  local target = exact[model]
  if target then return target end
  for _, p in ipairs(patterns) do
    if find(model, p.pattern) then return p.target end
  end
  return nil
end

local plugin
plugin = {
  name = "model_alias",
  priority = 1000,

  init = function(conf)
    exact, patterns = {}, {}
    local models = {}
    for alias, target in pairs(gemgate.settings.model_aliases) do
      local name = gsub(alias, "^models/", "")
      models[#models + 1] = name
      if find(name, "*", 1, true) then
        patterns[#patterns + 1] = { pattern = lua_pattern(name), target = target, length = #name }
      else
        exact[name] = target
      end
    end
    table.sort(patterns, function(a, b) return a.length > b.length end)
    -- Only calls to an alias reach on_request; with none, nothing is done at all.
    plugin.models = models
    if #models == 0 then plugin.on_request, plugin.filter_models = nil, nil end
  end,

  on_request = function(req, ctx)
    local target = target_of(req.model)
    if target == nil or target == req.model then return nil end
    return gemgate.rewrite { model = target }
  end,

  -- Each exact alias is listed beside the model it stands for (a copy named after it).
  filter_models = function(models, ctx)
    local by_name = {}
    for _, m in ipairs(models) do by_name[gsub(m.name, "^models/", "")] = m end
    local names = {}
    for alias in pairs(exact) do names[#names + 1] = alias end
    table.sort(names)
    for _, alias in ipairs(names) do
      local base = by_name[exact[alias]]
      if base and not by_name[alias] then
        local copy = {}
        for k, v in pairs(base) do copy[k] = v end
        copy.name = "models/" .. alias
        copy.displayName = alias .. " (" .. (base.displayName or exact[alias]) .. ")"
        models[#models + 1] = copy
      end
    end
    return models
  end,
}

return plugin
