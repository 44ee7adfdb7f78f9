-- Tests of weighted_tags.lua (off by default), run alone (`only` switches it on).
local only = { "weighted_tags" }

test("a tag weighted 0 is never chosen", function()
  local on = { weighted_tags = { tags = { free = 0 } } }
  local pool = { { id = "free-1", tags = { "free" } }, { id = "paid-1", tags = { "paid" } } }
  for _ = 1, 20 do
    local r = run { plugins = on, only = only, pool = pool }
    expect.key(r, "paid-1")
    expect.eq(r.chosen_by, "weighted_tags")
  end
end)

test("every key weighted 0 leaves the choice to the next rule", function()
  local on = { weighted_tags = { tags = { free = 0 } } }
  local r = run { plugins = on, only = only, pool = { { id = "a", tags = { "free" } } } }
  expect.key(r, "a")
  expect.eq(r.chosen_by, "built-in")
end)

test("a negative factor is refused when the plugin loads", function()
  expect.error(function()
    run { plugins = { weighted_tags = { tags = { free = -1 } } }, only = only }
  end, "must be a number >= 0")
end)
