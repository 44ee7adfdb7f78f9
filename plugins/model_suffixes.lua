-- model_suffixes: gemini-balance's derived models.
--
--   <m>-search        adds the googleSearch tool        (only for SEARCH_MODELS)
--   <m>-image         asks for text and image output    (only for IMAGE_MODELS)
--   <m>-non-thinking  sets the thinking budget to 0    (listed for THINKING_MODELS)
--
-- The request goes to Google as <m>; model lists show the derived models beside their base.
--
--   curl -s localhost:8000/v1beta/models/gemini-2.5-flash-search:generateContent \
--     -H "x-goog-api-key: $TOKEN" -d '{"contents":[{"parts":[{"text":"news today?"}]}]}'
--   # Google receives gemini-2.5-flash with "tools": [{"googleSearch": {}}]
local find, sub = string.find, string.sub
local search, image, thinking = {}, {}, {}

local function set_of(list)
  local s = {}
  for _, m in ipairs(list or {}) do s[(m:gsub("^models/", ""))] = true end
  return s
end

local suffixes = {
  {
    suffix = "-search",
    allowed = function(base) return search[base] end,
    rewrite = function(base)
      return gemgate.rewrite { model = base, tools = { { googleSearch = {} } } }
    end,
  },
  {
    suffix = "-image",
    allowed = function(base) return image[base] end,
    rewrite = function(base)
      return gemgate.rewrite {
        model = base,
        generation_config = { responseModalities = { "Text", "Image" } },
      }
    end,
  },
  {
    suffix = "-non-thinking",
    allowed = function(base) return true end,
    listed = function(base) return thinking[base] end,
    rewrite = function(base)
      return gemgate.rewrite {
        model = base,
        generation_config = { thinkingConfig = { thinkingBudget = 0 } },
      }
    end,
  },
}

return {
  name = "model_suffixes",
  priority = 100,
  -- Only calls to a derived model reach on_request; the others never enter the VM.
  models = { "*-search", "*-image", "*-non-thinking" },

  init = function(conf)
    search = set_of(gemgate.settings.search_models)
    image = set_of(gemgate.settings.image_models)
    thinking = set_of(gemgate.settings.thinking_models)
  end,

  on_request = function(req, ctx)
    local model = req.model
    for _, s in ipairs(suffixes) do
      if find(model, s.suffix, -#s.suffix, true) then
        local base = sub(model, 1, -#s.suffix - 1)
        if base ~= "" and s.allowed(base) then return s.rewrite(base) end
        return nil
      end
    end
  end,

  filter_models = function(models, ctx)
    local out = {}
    for _, m in ipairs(models) do
      out[#out + 1] = m
      local base = (m.name or ""):gsub("^models/", "")
      for _, s in ipairs(suffixes) do
        if (s.listed or s.allowed)(base) then
          local derived = {}
          for k, v in pairs(m) do derived[k] = v end
          derived.name = "models/" .. base .. s.suffix
          if m.displayName then derived.displayName = m.displayName .. " " .. s.suffix:sub(2) end
          out[#out + 1] = derived
        end
      end
    end
    return out
  end,
}
