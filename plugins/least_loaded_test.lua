-- Tests of least_loaded.lua (off by default: each test switches it on).
local on = { least_loaded = { enabled = true } }

test("takes the key serving the fewest requests", function()
  local r = run {
    request = { model = "gemini-2.5-flash" },
    plugins = on,
    pool = { { id = "busy", in_flight = 5 }, { id = "idle" }, { id = "busier", in_flight = 9 } },
  }
  expect.key(r, "idle")
  expect.eq(r.chosen_by, "least_loaded")
end)

test("a sample below 1 is refused when the plugin loads", function()
  expect.error(function()
    run { plugins = { least_loaded = { enabled = true, sample = 0 } } }
  end, "sample must be at least 1")
end)
