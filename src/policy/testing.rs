//! Plugin tests: `gemgate plugin test`, `gemgate check --with-tests` and
//! `policy.require_tests`.
//!
//! A test file is a `*_test.lua` file in the plugins folder. It runs in a sandbox like a
//! plugin's, with three more globals: `test(name, fn)` declares a test, `run(scenario)` runs
//! the enabled plugin chain on a request (see [`super::harness`]) and answers what it did, and
//! `expect` holds the assertions. A failed assertion names the file and line.
//!
//! ```lua
//! test("gpt-4o is served by gemini-2.5-flash", function()
//!   local r = run { request = { model = "gpt-4o" },
//!                   settings = { model_aliases = { ["gpt-4o"] = "gemini-2.5-flash" } } }
//!   expect.eq(r.model, "gemini-2.5-flash")
//! end)
//! ```

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{LuaSerdeExt, SerializeOptions, Value};

use super::engine::{Overrides, Policy};
use super::harness::{Scenario, ScenarioKey, simulate, test_pool};
use super::{Host, Limits, PluginSource, PolicyError, Vm, embedded};

/// What one test file may use: far more than a hook, since each `run` loads the plugins anew.
const TEST_LIMITS: Limits = Limits {
    instructions: 200_000_000,
    time: Duration::from_secs(20),
    memory_bytes: 64 * 1024 * 1024,
};

/// Tests one file may declare, at most.
const MAX_TESTS: usize = 1000;

/// The assertions, in Lua: each raises its error at the caller's line.
const EXPECT: &str = r#"
local function show(v, depth)
  depth = depth or 0
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) ~= "table" then return tostring(v) end
  if depth > 3 then return "{...}" end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for i, k in ipairs(keys) do
    if i > 20 then parts[#parts + 1] = "..." break end
    local name = (type(k) == "number") and "" or (tostring(k) .. " = ")
    parts[#parts + 1] = name .. show(v[k], depth + 1)
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end
local function equal(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do if not equal(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
local function fail(what, message)
  error((what and (what .. ": ") or "") .. message, 3)
end
local expect = {}
function expect.eq(actual, expected, what)
  if not equal(actual, expected) then
    fail(what, "expected " .. show(expected) .. ", got " .. show(actual))
  end
end
function expect.ne(actual, unexpected, what)
  if equal(actual, unexpected) then fail(what, "expected anything but " .. show(unexpected)) end
end
function expect.truthy(v, what)
  if not v then fail(what, "expected a true value, got " .. show(v)) end
end
function expect.falsy(v, what)
  if v then fail(what, "expected false or nil, got " .. show(v)) end
end
function expect.matches(s, pattern, what)
  if type(s) ~= "string" or not s:find(pattern) then
    fail(what, "expected a string matching " .. show(pattern) .. ", got " .. show(s))
  end
end
function expect.denied(r, status, pattern)
  if not r.denied then fail(nil, "expected a denial, but the request went on (model " .. show(r.model) .. ")") end
  if status and r.denied.status ~= status then
    fail(nil, "expected a denial with status " .. status .. ", got " .. show(r.denied))
  end
  if pattern and not r.denied.message:find(pattern) then
    fail(nil, "expected a denial matching " .. show(pattern) .. ", got " .. show(r.denied.message))
  end
end
function expect.allowed(r)
  if r.denied then fail(nil, "expected no denial, got " .. show(r.denied)) end
end
function expect.key(r, id)
  if r.key ~= id then
    fail(nil, "expected key " .. show(id) .. ", got " .. show(r.key) .. (r.no_key and (" (" .. r.no_key .. ")") or ""))
  end
end
function expect.error(f, pattern)
  local ok, e = pcall(f)
  if ok then fail(nil, "expected an error" .. (pattern and (" matching " .. show(pattern)) or "")) end
  if pattern and not tostring(e):find(pattern) then
    fail(nil, "expected an error matching " .. show(pattern) .. ", got " .. show(tostring(e)))
  end
end
return expect
"#;

/// One test's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestResult {
    pub file: String,
    pub name: String,
    /// The failure, with the file and line of the assertion; `None`: passed.
    pub failure: Option<String>,
}

/// Every test's outcome, in file and declaration order.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub results: Vec<TestResult>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    /// The first failure, as `file:line: message (test "name")`.
    pub fn first_failure(&self) -> Option<String> {
        self.results.iter().find_map(|r| {
            let f = r.failure.as_ref()?;
            Some(if f.contains(".lua:") {
                format!("{f} (test {:?})", r.name)
            } else {
                format!("{}: {f} (test {:?})", r.file, r.name)
            })
        })
    }

    /// The report as a test runner prints it: a line per test, then `N passed, N failed`.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut file = "";
        for r in &self.results {
            if r.file != file {
                file = &r.file;
                out.push_str(file);
                out.push('\n');
            }
            match &r.failure {
                None => out.push_str(&format!("  ok    {}\n", r.name)),
                Some(f) => out.push_str(&format!("  FAIL  {}\n        {f}\n", r.name)),
            }
        }
        out.push_str(&format!(
            "{} passed, {} failed\n",
            self.passed(),
            self.failed()
        ));
        out
    }
}

/// The test files of the plugins folder `dir` (`*_test.lua`, in name order), or of the
/// plugins built into gemgate.
pub fn test_sources(dir: Option<&Path>) -> Result<Vec<PluginSource>, PolicyError> {
    match dir {
        Some(d) => super::read_lua(d, true).map_err(|e| PolicyError {
            plugin: "-".into(),
            hook: "test".into(),
            message: format!("cannot read the test files of {}: {e}", d.display()),
        }),
        None => Ok(embedded::tests()),
    }
}

/// Whether a `.lua` file (by its name without `.lua`) is a test rather than a plugin.
pub fn is_test(name: &str) -> bool {
    name.ends_with("_test")
}

/// Runs the tests of the plugins folder `dir` (`None`: the built-in plugins and their tests)
/// against its plugins, with `config`'s settings. `Err`: the plugins themselves do not load.
pub fn test_folder(
    config: &crate::config::Config,
    dir: Option<&Path>,
) -> Result<Report, PolicyError> {
    let files = test_sources(dir)?;
    let pool = crate::keys::KeyPool::new(&[], &Default::default(), 1, &config.quota);
    let base = Policy::compile_from(
        config,
        dir.map(Path::to_path_buf),
        0,
        Arc::new(pool),
        Arc::new(super::counters::Counters::default()),
        Default::default(),
    )?;
    Ok(run_tests(&base, &config.quota, &files))
}

/// With `policy.require_tests`: the tests of `policy`'s folder must all pass, or the policy
/// is refused with the first failure (its file and line). Not run again when `previous`
/// passed them with the same plugins, settings and tests (a reload of the keys, say).
pub fn require_passing(
    policy: &Policy,
    quota: &crate::config::quota::QuotaLimits,
    previous: Option<&Policy>,
) -> Result<(), PolicyError> {
    let files = test_sources(policy.dir())?;
    let fingerprint = policy.fingerprint(&files);
    if previous.and_then(|p| p.tests_passed.get()) == Some(&fingerprint) {
        let _ = policy.tests_passed.set(fingerprint);
        return Ok(());
    }
    let report = run_tests(policy, quota, &files);
    match report.first_failure() {
        None => {
            tracing::info!(passed = report.passed(), "plugin tests passed");
            let _ = policy.tests_passed.set(fingerprint);
            Ok(())
        }
        Some(first) => Err(PolicyError {
            plugin: "tests".into(),
            hook: "test".into(),
            message: format!(
                "{} of {} plugin tests failed (policy.require_tests); first: {first}",
                report.failed(),
                report.results.len()
            ),
        }),
    }
}

/// What checking an edited plugin or test file found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EditCheck {
    /// Whether the plugins load with the edit (every `init` passing): what a reload needs.
    pub loads: bool,
    /// Why they do not, and at which line of the edited file.
    pub error: Option<String>,
    pub line: Option<u32>,
    /// The folder's tests, run with the edit.
    pub tests: Report,
    pub passed: usize,
    pub failed: usize,
}

/// Checks `edited` (a plugin, or a `*_test.lua` file) against `policy`'s folder: the plugins
/// load with it, and the folder's tests pass with it. Nothing is written.
pub fn check_edit(
    policy: &Policy,
    quota: &crate::config::quota::QuotaLimits,
    edited: &PluginSource,
) -> EditCheck {
    let mut files = test_sources(policy.dir()).unwrap_or_default();
    // An edited test runs in its file's place; an edited plugin, in a policy of its own.
    let loaded = if is_test(&edited.name) {
        match files.iter_mut().find(|f| f.name == edited.name) {
            Some(f) => *f = edited.clone(),
            None => files.push(edited.clone()),
        }
        Ok(None)
    } else {
        policy.edited(edited.clone()).map(Some)
    };
    let (error, tests) = match loaded {
        Ok(p) => (None, run_tests(p.as_ref().unwrap_or(policy), quota, &files)),
        Err(e) => (Some(e.to_string()), Report::default()),
    };
    // `/name.lua:`, not a longer name ending the same.
    let marker = format!("/{}.lua:", edited.name);
    let line = error.as_deref().and_then(|e| {
        let rest = &e[e.find(&marker)? + marker.len()..];
        rest.split(':').next()?.parse().ok()
    });
    EditCheck {
        loads: error.is_none(),
        line,
        error,
        passed: tests.passed(),
        failed: tests.failed(),
        tests,
    }
}

/// Runs every test of `files` against `base`'s plugins (each `run` a rehearsal of them).
pub fn run_tests(
    base: &Policy,
    quota: &crate::config::quota::QuotaLimits,
    files: &[PluginSource],
) -> Report {
    let mut report = Report::default();
    for file in files {
        run_file(base, quota, file, &mut report);
    }
    report
}

fn run_file(
    base: &Policy,
    quota: &crate::config::quota::QuotaLimits,
    file: &PluginSource,
    report: &mut Report,
) {
    let shown = file.path.display().to_string();
    let mut failed = |name: &str, message: String| {
        report.results.push(TestResult {
            file: shown.clone(),
            name: name.to_owned(),
            failure: Some(message),
        });
    };
    let vm = match Vm::with_host(TEST_LIMITS, Host::default()) {
        Ok(vm) => vm,
        Err(e) => return failed("(load)", e.message),
    };
    let declared = Declared::default();
    let scoped = vm.lua().scope(|scope| {
        let run = scope.create_function(|lua, scenario: Value| {
            // Rust's part of a run is not under the VM's clock: it gets one of its own.
            let deadline = Instant::now() + TEST_LIMITS.time;
            let verdict =
                rehearse(lua, base, quota, scenario, deadline).map_err(mlua::Error::runtime)?;
            let options = SerializeOptions::new()
                .serialize_none_to_null(false)
                .serialize_unit_to_null(false);
            lua.to_value_with(&verdict, options)
        })?;
        let loaded = assertions(&vm).and_then(|expect| {
            let globals = [
                ("test", Value::Function(declared.function(vm.lua())?)),
                ("run", Value::Function(run)),
                ("expect", expect),
            ];
            vm.script(file, &globals)
        });
        Ok(loaded.map(|_| run_declared(&vm, &file.name, &declared)))
    });
    match scoped {
        Ok(Ok(results)) if results.is_empty() => failed(
            "(file)",
            "declares no test: call test(name, function)".into(),
        ),
        Ok(Ok(results)) => {
            for (name, failure) in results {
                report.results.push(TestResult {
                    file: shown.clone(),
                    name,
                    failure,
                });
            }
        }
        Ok(Err(e)) => failed("(load)", e.message),
        Err(e) => failed("(load)", e.to_string()),
    }
}

/// The tests a file declares with `test(name, function)` while it loads.
#[derive(Default)]
struct Declared {
    tests: Rc<RefCell<Vec<(String, mlua::Function)>>>,
    /// Cleared once the file has loaded: a test may not declare another.
    loading: Rc<Cell<bool>>,
}

impl Declared {
    /// The file's `test` function.
    fn function(&self, lua: &mlua::Lua) -> Result<mlua::Function, PolicyError> {
        let (tests, loading) = (self.tests.clone(), self.loading.clone());
        loading.set(true);
        lua.create_function(move |_, (name, f): (String, mlua::Function)| {
            if !loading.get() {
                return Err(mlua::Error::runtime(
                    "test() declares a test when the file loads, not inside a test",
                ));
            }
            let mut tests = tests.borrow_mut();
            if tests.len() >= MAX_TESTS {
                return Err(mlua::Error::runtime(format!(
                    "a file declares at most {MAX_TESTS} tests"
                )));
            }
            tests.push((name, f));
            Ok(())
        })
        .map_err(|e| host_error(&e))
    }
}

/// Runs the tests `declared`, each under the limits: its name, and its failure.
fn run_declared(vm: &Vm, file: &str, declared: &Declared) -> Vec<(String, Option<String>)> {
    let name: Rc<str> = Rc::from(file);
    // Taken whole: a test that declares another (an error, see `Declared`) finds none here.
    let tests = std::mem::take(&mut *declared.tests.borrow_mut());
    declared.loading.set(false);
    tests
        .into_iter()
        .map(|(test, f)| {
            let failure = vm.invoke::<()>(&name, "test", &f, ()).err().map(|e| {
                let m = e.message;
                m.strip_prefix("runtime error: ")
                    .map_or(m.clone(), str::to_owned)
            });
            (test, failure)
        })
        .collect()
}

/// The `expect` table, made in the sandbox too: its `pcall` (in `expect.error`) must not
/// catch a spent budget.
fn assertions(vm: &Vm) -> Result<Value, PolicyError> {
    let source = PluginSource {
        name: "expect".into(),
        path: "expect".into(),
        code: EXPECT.into(),
    };
    vm.script(&source, &[])
}

fn host_error(e: &mlua::Error) -> PolicyError {
    PolicyError {
        plugin: "-".into(),
        hook: "test".into(),
        message: e.to_string(),
    }
}

/// `run(scenario)`: the scenario's pool (three active keys `k1`..`k3` unless it says), the
/// base policy rehearsed over it with the scenario's settings, and what it did.
fn rehearse(
    lua: &mlua::Lua,
    base: &Policy,
    quota: &crate::config::quota::QuotaLimits,
    scenario: Value,
    deadline: Instant,
) -> Result<super::harness::Verdict, String> {
    let scenario: Scenario = lua
        .from_value(scenario)
        .map_err(|e| format!("run: not a scenario: {e}"))?;
    let keys = scenario.pool.clone().unwrap_or_else(|| {
        (1..=3)
            .map(|i| ScenarioKey {
                id: format!("k{i}"),
                ..ScenarioKey::default()
            })
            .collect()
    });
    let (pool, _leases) = test_pool(&keys, quota).map_err(|e| format!("run: {e}"))?;
    let overrides = Overrides {
        plugins: scenario.plugins.clone(),
        settings: scenario.settings.clone(),
        only: scenario.only.clone(),
        live_counters: false,
    };
    let policy = base
        .rehearsal(Arc::clone(&pool), &overrides)
        .map_err(|e: PolicyError| format!("run: the plugins do not load: {e}"))?;
    simulate(&policy, &scenario, deadline).map_err(|e| format!("run: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> crate::config::Config {
        crate::config::from_str("", "t", &Default::default()).unwrap()
    }

    /// A plugins folder with the shipped plugins and `tests` (name → code) as its test files.
    fn folder(tests: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for p in embedded::sources() {
            std::fs::write(dir.path().join(format!("{}.lua", p.name)), p.code).unwrap();
        }
        for (name, code) in tests {
            std::fs::write(dir.path().join(format!("{name}_test.lua")), code).unwrap();
        }
        dir
    }

    #[test]
    fn the_shipped_plugins_pass_their_tests() {
        for dir in [
            None,
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins")),
        ] {
            let report = test_folder(&config(), dir.as_deref()).unwrap();
            assert_eq!(report.failed(), 0, "{}", report.text());
            assert!(report.passed() >= 30, "{}", report.text());
        }
    }

    /// The shipped tests hold whatever the config sets or switches on: an operator's
    /// `require_tests` must not fail on them for a setting the plugin does not read.
    #[test]
    fn the_shipped_tests_hold_under_any_config() {
        let toml = r#"
            [models]
            aliases = { "gpt-4o" = "gemini-2.5-flash", "*" = "gemini-2.5-pro" }
            filtered = ["gemini-2.5-flash", "gemini-2.5-pro"]
            search = ["gemini-2.5-pro"]
            thinking_budget_map = { "gemini-2.5-flash" = 7 }
            [plugins.sticky_key]
            enabled = true
            priority = 1000
            [plugins.rate_limit]
            enabled = true
            requests_per_minute = 1
            [plugins.model_allowlist]
            enabled = true
            default = ["nothing"]
        "#;
        let config = crate::config::from_str(toml, "t", &Default::default()).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
        let report = test_folder(&config, Some(&dir)).unwrap();
        assert_eq!(report.failed(), 0, "{}", report.text());
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins");
        assert_eq!(test_folder(&config, Some(&example)).unwrap().failed(), 0);
    }

    /// The worked example of plugins/README.md, as it is shipped.
    #[test]
    fn the_worked_example_passes_its_tests() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins");
        let report = test_folder(&config(), Some(&dir)).unwrap();
        assert_eq!(
            (report.passed(), report.failed()),
            (5, 0),
            "{}",
            report.text()
        );
    }

    #[test]
    fn failures_name_the_file_and_line_and_the_others_still_run() {
        let dir = folder(&[
            (
                "a",
                "test('passes', function() expect.eq(run({}).model, 'gemini-2.5-flash') end)\n\
                 test('fails', function()\n  expect.eq(run({}).model, 'gemini-9')\nend)\n\
                 test('raises', function() error('boom') end)",
            ),
            (
                "b",
                "test('loops', function() while true do end end)\n\
                 test('catches the budget', function() while true do expect.error(function() while true do end end) end end)\n\
                 test('nests', function() test('inner', function() end) end)\n\
                 test('misspells', function() run { plugins = { round_robn = { enabled = true } } } end)\n\
                 test('after', function() end)",
            ),
            ("c", "this is not lua"),
            ("d", "-- nothing declared"),
            (
                "e",
                "test('bad scenario', function() run { request = { model = string.rep('m', 300) } } end)\n\
                 test('unknown field', function() run { requests = {} } end)\n\
                 test('too many keys', function() local p = {} for i = 1, 1001 do p[i] = {} end run { pool = p } end)",
            ),
        ]);
        let report = test_folder(&config(), Some(dir.path())).unwrap();
        let text = report.text();
        let failure = |name: &str| {
            report
                .results
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("{name}: {text}"))
                .failure
                .clone()
        };
        assert_eq!(failure("passes"), None, "{text}");
        let fails = failure("fails").unwrap();
        assert!(
            fails.contains("a_test.lua:3: expected \"gemini-9\", got \"gemini-2.5-flash\""),
            "{fails}"
        );
        assert!(failure("raises").unwrap().contains("a_test.lua:5: boom"));
        assert!(failure("loops").unwrap().contains("instruction budget"));
        assert!(
            failure("catches the budget")
                .unwrap()
                .contains("instruction budget"),
            "a test cannot catch its own budget"
        );
        assert!(failure("nests").unwrap().contains("not inside a test"));
        assert!(
            failure("misspells")
                .unwrap()
                .contains("no plugin round_robn")
        );
        assert_eq!(
            failure("after"),
            None,
            "a runaway test does not stop the rest"
        );
        assert!(failure("bad scenario").unwrap().contains("longer than"));
        assert!(failure("unknown field").unwrap().contains("unknown field"));
        assert!(
            failure("too many keys")
                .unwrap()
                .contains("at most 1000 keys")
        );
        let loads: Vec<_> = report
            .results
            .iter()
            .filter(|r| r.name.starts_with('('))
            .map(|r| {
                (
                    r.file.rsplit('/').next().unwrap(),
                    r.failure.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(loads.len(), 2, "{text}");
        assert!(loads[0].0 == "c_test.lua" && loads[0].1.contains("c_test.lua:1:"));
        assert!(loads[1].0 == "d_test.lua" && loads[1].1.contains("declares no test"));
        assert!(text.ends_with(&format!(
            "{} passed, {} failed\n",
            report.passed(),
            report.failed()
        )));
        assert_eq!(report.failed(), 11, "{text}");
    }

    #[test]
    fn required_tests_refuse_the_policy_with_the_first_failure() {
        let dir = folder(&[(
            "z",
            "test('t', function()\n  expect.truthy(false, 'z')\nend)",
        )]);
        let config = config();
        let pool = Arc::new(crate::keys::KeyPool::new(
            &[],
            &Default::default(),
            1,
            &config.quota,
        ));
        let policy = Policy::compile_from(
            &config,
            Some(dir.path().to_path_buf()),
            1,
            pool,
            Arc::new(super::super::counters::Counters::default()),
            Default::default(),
        )
        .unwrap();
        let e = require_passing(&policy, &config.quota, None).unwrap_err();
        assert!(e.message.contains("1 of "), "{e}");
        assert!(
            e.message.contains("z_test.lua:2: z: expected a true value"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join("z_test.lua")).unwrap();
        require_passing(&policy, &config.quota, None).unwrap();
    }
}
