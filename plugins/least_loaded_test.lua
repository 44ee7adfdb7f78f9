-- Tests of least_loaded.lua (off by default), run alone: `only` switches it on and the others
-- off.
local only = { "least_loaded" }

test("takes the key serving the fewest requests", function()
  local r = run {
    request = { model = "gemini-2.5-flash" },
    only = only,
    pool = { { id = "busy", in_flight = 5 }, { id = "idle" }, { id = "busier", in_flight = 9 } },
  }
  expect.key(r, "idle")
  expect.eq(r.chosen_by, "least_loaded")
end)

test("a sample below 1 is refused when the plugin loads", function()
  expect.error(function()
    run { plugins = { least_loaded = { sample = 0 } }, only = only }
  end, "sample must be at least 1")
end)
