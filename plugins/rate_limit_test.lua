-- Tests of rate_limit.lua (off by default). The limit is declared, not counted in a hook:
-- the verdict lists it, with the rate for the client.
local on = { rate_limit = { requests_per_minute = 30, clients = { batch = 600 } } }
local only = { "rate_limit" }

test("every client's calls count against the declared limit", function()
  local r = run { request = { client = "alice" }, plugins = on, only = only }
  expect.eq(r.limits, { { plugin = "rate_limit", per_minute = 30 } })
end)

test("a client may have a rate of its own", function()
  local r = run { request = { client = "batch" }, plugins = on, only = only }
  expect.eq(r.limits[1].per_minute, 600)
end)

test("switched off, nothing is limited", function()
  expect.eq(run({ plugins = { rate_limit = { enabled = false } } }).limits, {})
end)

test("a rate below 1 is refused when the plugin loads", function()
  expect.error(function()
    run { plugins = { rate_limit = { requests_per_minute = 0 } }, only = only }
  end, "at least 1")
end)

test("the call past the limit within a minute is refused with 429", function()
  local limited = { rate_limit = { requests_per_minute = 3 } }
  expect.allowed(run { request = { client = "alice" }, plugins = limited, only = only, times = 3 })
  local r = run { request = { client = "alice" }, plugins = limited, only = only, times = 4 }
  expect.denied(r, 429, "3 requests per minute for alice")
end)
