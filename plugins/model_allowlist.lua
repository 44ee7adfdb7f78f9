-- model_allowlist: each client may use only the models listed for it (off by default).
--
-- Clients are named by their token's name (`{ name = "alice", token = "…" }` in
-- [auth] allowed_tokens). A client with no entry may use every model, unless `default` lists
-- what such clients may use. Model lists show each client only its models. Derived models
-- (`<m>-search`, …) follow their base model: this plugin runs after model_suffixes has
-- rewritten the request to the base model.
--
--   # gemgate.toml:
--   #   [plugins.model_allowlist]
--   #   enabled = true
--   #   clients = { alice = ["gemini-2.5-flash"] }
--   curl -s localhost:8000/v1beta/models/gemini-2.5-pro:generateContent \
--     -H "x-goog-api-key: $ALICE_TOKEN" -d '{"contents":[{"parts":[{"text":"hi"}]}]}'
--   # → 403 "client alice may not use gemini-2.5-pro"
local clients, default = {}, nil

local function set_of(list)
  local s = {}
  for _, m in ipairs(list) do s[(m:gsub("^models/", ""))] = true end
  return s
end

local find, sub = string.find, string.sub
local SUFFIXES = { "-search", "-image", "-non-thinking" }

local function base_of(model)
  for _, suffix in ipairs(SUFFIXES) do
    if find(model, suffix, -#suffix, true) then return sub(model, 1, -#suffix - 1) end
  end
  return model
end

local function allowed(client)
  return clients[client] or default
end

return {
  name = "model_allowlist",
  priority = 40,
  enabled = false,
  schema = { clients = "table", default = "list" },

  init = function(conf)
    clients, default = {}, nil
    for client, models in pairs(conf.clients or {}) do clients[client] = set_of(models) end
    if conf.default then default = set_of(conf.default) end
  end,

  on_request = function(req, ctx)
    local models = allowed(req.client)
    if models == nil or req.model == "" then return nil end
    if not models[req.model] then
      return gemgate.deny(403, "client " .. req.client .. " may not use " .. req.model)
    end
  end,

  filter_models = function(list, ctx)
    local models = allowed(ctx.client)
    if models == nil then return nil end
    local kept = {}
    for _, m in ipairs(list) do
      local name = (m.name or ""):gsub("^models/", "")
      if models[name] or models[base_of(name)] then kept[#kept + 1] = m end
    end
    return kept
  end,
}
