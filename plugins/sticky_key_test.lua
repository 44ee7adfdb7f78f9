-- Tests of sticky_key.lua (off by default), run alone (`only` switches it on).
local only = { "sticky_key" }

test("a client keeps its key", function()
  local first = run { request = { client = "alice" }, only = only }
  expect.eq(first.chosen_by, "sticky_key")
  for _ = 1, 5 do
    expect.key(run { request = { client = "alice" }, only = only }, first.key)
  end
end)

test("clients spread over the keys", function()
  local seen, n = {}, 0
  for i = 1, 30 do
    local key = run({ request = { client = "client-" .. i }, only = only }).key
    if not seen[key] then seen[key], n = true, n + 1 end
  end
  expect.truthy(n >= 2, "30 clients on " .. n .. " key(s)")
end)

test("a client whose key is out moves to another", function()
  local first = run { request = { client = "alice" }, only = only }
  local pool = {}
  for i = 1, 3 do
    local id = "k" .. i
    pool[i] = { id = id, state = (id == first.key) and "disabled" or "active" }
  end
  local r = run { request = { client = "alice" }, only = only, pool = pool }
  expect.ne(r.key, first.key)
  expect.truthy(r.key)
end)
