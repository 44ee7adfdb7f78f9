-- Tests of round_robin.lua, run alone (`only`): whatever else the config enables, they hold.
local only = { "round_robin" }

test("takes a usable key, and says so", function()
  local r = run { request = { model = "gemini-2.5-flash" }, only = only }
  expect.allowed(r)
  expect.truthy(r.key, "a key is chosen")
  expect.eq(r.chosen_by, "round_robin")
end)

test("passes over disabled and cooling keys", function()
  local r = run {
    request = { model = "gemini-2.5-flash" },
    only = only,
    pool = {
      { id = "dead", state = "disabled" },
      { id = "hot", state = "cooling", cooldown_s = 30 },
      { id = "ok" },
    },
  }
  expect.key(r, "ok")
  expect.matches(r.keys[1].why, "^disabled")
  expect.matches(r.keys[2].why, "^cooling")
  expect.eq(r.keys[3].why, "chosen")
end)

test("a cooldown for another model does not keep a key out", function()
  local r = run {
    request = { model = "gemini-2.5-flash" },
    only = only,
    pool = { { id = "a", state = "cooling", cooldown_model = "gemini-2.5-pro" } },
  }
  expect.key(r, "a")
end)

test("with every key out there is no key, and why", function()
  local r = run {
    request = { model = "gemini-2.5-flash" },
    only = only,
    pool = { { id = "a", state = "disabled" }, { id = "b", state = "cooling" } },
  }
  expect.key(r, nil)
  expect.matches(r.no_key, "1 cooling, 1 disabled")
end)
