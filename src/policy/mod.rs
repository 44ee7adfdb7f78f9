//! Lua policy plugins: the sandboxed VM, its limits, the host table and plugin loading.
//!
//! This is the engine the plugin hooks run on (DESIGN.md, "Lua policy"). A [`Vm`] is a Lua 5.4
//! state with only the `string`, `table`, `math` and `utf8` libraries and the `gemgate` host
//! table; every call into it runs under an instruction budget, a time limit and a memory limit,
//! and a call that breaks one fails with a [`PolicyError`] naming the plugin and the line.
//!
//! [`engine`] gives each generation's plugins to the request path: one VM per worker thread,
//! the hooks in priority order, failures counted and turned into the built-in behaviour.

pub mod counters;
pub mod embedded;
pub mod engine;
pub mod harness;
pub mod rewrite;
pub mod testing;
pub mod trace;

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{
    HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, Table, UserData, UserDataMethods, Value,
    VmState,
};
use sha2::{Digest, Sha256};

use counters::{CounterSlot, CounterStore, Counters};

/// The hooks a plugin may define.
pub const HOOKS: &[&str] = &[
    "init",
    "on_request",
    "filter_models",
    "select_key",
    "on_response",
    "on_error",
    "on_log",
];

/// How often (in VM instructions) the budget and the clock are checked.
const CHECK_EVERY: u32 = 1000;

pub use crate::config::Limits;

/// A plugin call or load that failed; `plugin` and `hook` say where, the message has the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin}, {hook}: {message}")]
pub struct PolicyError {
    pub plugin: String,
    pub hook: String,
    pub message: String,
}

/// A plugin file as read from disk.
#[derive(Debug, Clone)]
pub struct PluginSource {
    /// The file name without `.lua`.
    pub name: String,
    pub path: PathBuf,
    pub code: String,
}

/// Reads every plugin of `dir`: its `*.lua` files but the tests (`*_test.lua`), in name order.
pub fn read_dir(dir: &Path) -> std::io::Result<Vec<PluginSource>> {
    read_lua(dir, false)
}

/// The `*.lua` files of `dir` that are tests (`tests`) or plugins, in name order.
fn read_lua(dir: &Path, tests: bool) -> std::io::Result<Vec<PluginSource>> {
    Ok(crate::config::read_folder(dir, "lua")?
        .into_iter()
        .filter(|(name, _, _)| testing::is_test(name) == tests)
        .map(|(name, path, code)| PluginSource { name, path, code })
        .collect())
}

/// Whether `name` may name a plugin file (`name.lua`): 1 to 64 lower-case letters, digits and
/// `_`. What the admin page may read and write is held to this: no path, no dot.
pub fn is_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `model` matches `pattern`: a model name in which `*` stands for any run of
/// characters (`"*-search"`, `"gemini-2.5-*"`).
pub fn model_matches(pattern: &str, model: &str) -> bool {
    let Some((head, tail)) = pattern.split_once('*') else {
        return pattern == model;
    };
    let Some(rest) = model.strip_prefix(head) else {
        return false;
    };
    let (middle, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    for part in middle.split('*').filter(|p| !p.is_empty()) {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// A plugin table's `models`: a list of model names or patterns, or nil for every model.
fn read_models(table: &Table) -> Result<Option<Rc<[String]>>, String> {
    let wrong = || "`models` must be a list of model names".to_owned();
    let list = match table.get::<Value>("models") {
        Ok(Value::Nil) => return Ok(None),
        Ok(Value::Table(list)) => list,
        _ => return Err(wrong()),
    };
    let mut models = Vec::new();
    for item in list.sequence_values::<Value>() {
        match item {
            Ok(Value::String(m)) if !m.as_bytes().is_empty() => {
                let m = m.to_string_lossy();
                models.push(m.strip_prefix("models/").unwrap_or(&m).to_owned());
            }
            _ => return Err(wrong()),
        }
    }
    Ok(Some(Rc::from(models)))
}

/// A limit a plugin declares in its table, e.g. `limits = { per_client_rpm = 60, clients = {
/// ["batch-job"] = 600 } }` (set there or by its `init`). The host checks and counts it before
/// `on_request` runs, for the calls of a model the plugin takes: in this process alone, in one
/// Redis script call in a fleet (Lua hooks are synchronous and cannot wait on Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredLimit {
    /// Requests per client per minute.
    pub per_client_rpm: u64,
    /// Per-client exceptions to `per_client_rpm`.
    pub clients: std::collections::BTreeMap<String, u64>,
}

impl DeclaredLimit {
    /// The requests per minute `client` may make.
    pub fn rpm_for(&self, client: &str) -> u64 {
        self.clients
            .get(client)
            .copied()
            .unwrap_or(self.per_client_rpm)
    }
}

fn read_limits(table: &Table) -> Result<Option<DeclaredLimit>, String> {
    let limits = match table.get::<Value>("limits") {
        Ok(Value::Nil) => return Ok(None),
        Ok(Value::Table(t)) => t,
        _ => return Err("`limits` must be a table".to_owned()),
    };
    let count = |v: Value, what: &str| match v {
        Value::Integer(n) if n >= 0 => Ok(n as u64),
        Value::Number(n) if n >= 0.0 && n.fract() == 0.0 && n < 1e15 => Ok(n as u64),
        _ => Err(format!("`limits.{what}` must be a whole number, 0 or more")),
    };
    let mut out = DeclaredLimit {
        per_client_rpm: 0,
        clients: Default::default(),
    };
    let mut rpm = None;
    for pair in limits.pairs::<String, Value>() {
        let (name, value) = pair.map_err(|_| "`limits` fields are names".to_owned())?;
        match name.as_str() {
            "per_client_rpm" => rpm = Some(count(value, "per_client_rpm")?),
            "clients" => {
                let Value::Table(clients) = value else {
                    return Err("`limits.clients` must map client names to numbers".to_owned());
                };
                for pair in clients.pairs::<String, Value>() {
                    let (client, n) =
                        pair.map_err(|_| "`limits.clients` keys are client names".to_owned())?;
                    let n = count(n, "clients")?;
                    out.clients.insert(client, n);
                }
            }
            other => {
                return Err(format!(
                    "`limits.{other}` is not a limit gemgate knows (per_client_rpm, clients)"
                ));
            }
        }
    }
    match rpm {
        // A table without a rate is a limit not switched on (its `init` did not set one).
        None if out.clients.is_empty() => Ok(None),
        None => Err("`limits.clients` needs `limits.per_client_rpm`".to_owned()),
        Some(n) => {
            out.per_client_rpm = n;
            Ok(Some(out))
        }
    }
}

/// Whether `model` matches any of `patterns` (see [`model_matches`]).
pub fn matches_any(patterns: &[String], model: &str) -> bool {
    patterns.iter().any(|p| model_matches(p, model))
}

/// A plugin loaded into a [`Vm`].
#[derive(Debug, Clone)]
pub struct Plugin {
    pub name: Rc<str>,
    pub priority: i64,
    /// The plugin's own default; `[plugins.<name>] enabled` overrides it.
    pub enabled: bool,
    /// The hooks it defines, in [`HOOKS`] order.
    pub hooks: Vec<&'static str>,
    /// The models its per-call hooks (all but `init` and `filter_models`) run for, as names or
    /// patterns with `*`; `None`: every model.
    pub models: Option<Rc<[String]>>,
    /// The limits the host checks for it before `on_request`.
    pub limits: Option<DeclaredLimit>,
    table: Table,
}

impl Plugin {
    pub fn has(&self, hook: &str) -> bool {
        self.hooks.contains(&hook)
    }

    /// Reads `models` again, after an `init` that may have set it from the plugin's settings.
    pub fn reread_models(&mut self) -> Result<(), PolicyError> {
        let fail = |message| PolicyError {
            plugin: self.name.to_string(),
            hook: "init".into(),
            message,
        };
        self.models = read_models(&self.table).map_err(fail)?;
        self.limits = read_limits(&self.table).map_err(fail)?;
        Ok(())
    }

    /// The function of `hook`, if the plugin defines it.
    pub fn hook(&self, hook: &str) -> Option<mlua::Function> {
        self.table
            .raw_get::<Option<mlua::Function>>(hook)
            .ok()
            .flatten()
    }

    /// The plugin's `schema`: config field → type name.
    pub fn schema(&self) -> Result<Option<Vec<(String, String)>>, PolicyError> {
        let fail = |message: String| PolicyError {
            plugin: self.name.to_string(),
            hook: "schema".into(),
            message,
        };
        match self.table.get::<Value>("schema") {
            Ok(Value::Nil) => Ok(None),
            Ok(Value::Table(t)) => {
                let mut fields = Vec::new();
                for pair in t.pairs::<String, String>() {
                    let (k, v) = pair
                        .map_err(|_| fail("`schema` must map field names to type names".into()))?;
                    if !SCHEMA_TYPES.contains(&v.as_str()) {
                        return Err(fail(format!(
                            "field {k:?} has type {v:?}; use one of {}",
                            SCHEMA_TYPES.join(", ")
                        )));
                    }
                    fields.push((k, v));
                }
                fields.sort();
                Ok(Some(fields))
            }
            _ => Err(fail("`schema` must be a table".into())),
        }
    }
}

/// The type names a plugin's `schema` may use.
pub const SCHEMA_TYPES: &[&str] = &["string", "number", "integer", "boolean", "list", "table"];

/// Per-call budget, shared with the VM's instruction hook.
#[derive(Clone, Copy)]
struct Budget {
    left: i64,
    deadline: Instant,
}

impl Budget {
    /// Whether the call has used up its instructions or its time.
    fn spent(self) -> bool {
        self.left < 0 || Instant::now() > self.deadline
    }
}

/// A sandboxed Lua state.
pub struct Vm {
    lua: Lua,
    limits: Limits,
    budget: Rc<Cell<Budget>>,
    /// The plugin being called: counters are kept per plugin.
    current: Rc<RefCell<Rc<str>>>,
    /// Makes a plugin's environment (see [`SANDBOX`]).
    make_env: mlua::Function,
}

/// What the host table serves: the shared counters and the settings plugins may read.
pub struct Host {
    pub counters: Arc<dyn CounterStore>,
    /// `gemgate.settings`: the model settings of the config (no secrets).
    pub settings: serde_json::Value,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            counters: Arc::new(Counters::default()),
            settings: serde_json::json!({}),
        }
    }
}

impl Vm {
    pub fn new(limits: Limits) -> Result<Vm, PolicyError> {
        Vm::with_host(limits, Host::default())
    }

    pub fn with_host(limits: Limits, host: Host) -> Result<Vm, PolicyError> {
        let fail = |e: mlua::Error| PolicyError {
            plugin: "-".into(),
            hook: "vm".into(),
            message: e.to_string(),
        };
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(fail)?;
        let budget = Rc::new(Cell::new(Budget {
            left: i64::MAX,
            deadline: Instant::now() + Duration::from_secs(3600),
        }));
        let current: Rc<RefCell<Rc<str>>> = Rc::new(RefCell::new(Rc::from("-")));
        let host = host_table(&lua, host, current.clone()).map_err(fail)?;
        let spent = {
            let budget = budget.clone();
            lua.create_function(move |_, ()| Ok(budget.get().spent()))
                .map_err(fail)?
        };
        let make_env: mlua::Function = lua
            .load(SANDBOX)
            .set_name("=gemgate")
            .call((host, spent))
            .map_err(fail)?;
        lua.set_memory_limit(limits.memory_bytes).map_err(fail)?;
        let watched = budget.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            move |_, _| {
                let mut b = watched.get();
                b.left -= i64::from(CHECK_EVERY);
                watched.set(b);
                if b.left < 0 {
                    return Err(mlua::Error::runtime("instruction budget exceeded"));
                }
                if Instant::now() > b.deadline {
                    return Err(mlua::Error::runtime("time limit exceeded"));
                }
                Ok(VmState::Continue)
            },
        )
        .map_err(fail)?;
        Ok(Vm {
            lua,
            limits,
            budget,
            current,
            make_env,
        })
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Compiles and runs a plugin file under the limits and checks the table it returns.
    pub fn load(&self, src: &PluginSource) -> Result<Plugin, PolicyError> {
        let fail = |message: String| PolicyError {
            plugin: src.name.clone(),
            hook: "load".into(),
            message,
        };
        let value = self.script(src, &[])?;
        let Value::Table(table) = value else {
            return Err(fail("the file must return a table".into()));
        };
        let name: String = table
            .get("name")
            .map_err(|_| fail("`name` must be a string".into()))?;
        if *name != *src.name {
            return Err(fail(format!(
                "`name` is {name:?}, but the file is {}.lua",
                src.name
            )));
        }
        let priority: i64 = table
            .get::<Option<i64>>("priority")
            .map_err(|_| fail("`priority` must be an integer".into()))?
            .unwrap_or(0);
        let enabled: bool = table
            .get::<Option<bool>>("enabled")
            .map_err(|_| fail("`enabled` must be a boolean".into()))?
            .unwrap_or(true);
        let models = read_models(&table).map_err(fail)?;
        let limits = read_limits(&table).map_err(fail)?;
        let mut hooks = Vec::new();
        for &hook in HOOKS {
            match table.get::<Value>(hook) {
                Ok(Value::Function(_)) => hooks.push(hook),
                Ok(Value::Nil) => {}
                _ => return Err(fail(format!("`{hook}` must be a function"))),
            }
        }
        Ok(Plugin {
            name: Rc::from(name),
            priority,
            enabled,
            hooks,
            models,
            limits,
            table,
        })
    }

    /// Runs a file (a plugin's, a plugin test's) in an environment of its own, with `globals`
    /// added to it, under the limits; returns what it returns. Each file has its own globals
    /// and its own read-only views of the libraries and the host table: nothing one does to
    /// them reaches another.
    pub fn script(
        &self,
        src: &PluginSource,
        globals: &[(&str, Value)],
    ) -> Result<Value, PolicyError> {
        let fail = |message: String| PolicyError {
            plugin: src.name.clone(),
            hook: "load".into(),
            message,
        };
        let env: Table = self
            .make_env
            .call(())
            .map_err(|e: mlua::Error| fail(e.to_string()))?;
        for (name, value) in globals {
            env.raw_set(*name, value.clone())
                .map_err(|e| fail(e.to_string()))?;
        }
        let chunk = self
            .lua
            .load(&src.code)
            .set_name(format!("@{}", src.path.display()))
            .set_environment(env);
        // Loading runs off the request path, at start and reload: the instruction budget
        // bounds its work, and the clock only a stall. A plugin's 50 ms were a load's whole
        // allowance, which a busy machine's scheduler alone could take (a reload refused
        // for a plugin that had done nothing wrong).
        let time = self.limits.time.max(LOAD_TIME);
        self.guarded_for(time, || chunk.eval())
            .0
            .map_err(|e| fail(clean(&e)))
    }

    /// Calls `hook` of `plugin` under the limits.
    pub fn call<R: mlua::FromLuaMulti>(
        &self,
        plugin: &Plugin,
        hook: &str,
        args: impl mlua::IntoLuaMulti,
    ) -> Result<R, PolicyError> {
        let f = plugin.hook(hook).ok_or_else(|| PolicyError {
            plugin: plugin.name.to_string(),
            hook: hook.into(),
            message: format!("the plugin has no {hook}"),
        })?;
        self.invoke(&plugin.name, hook, &f, args)
    }

    /// Calls `f` on behalf of `hook` of plugin `name`, under the limits.
    pub fn invoke<R: mlua::FromLuaMulti>(
        &self,
        name: &Rc<str>,
        hook: &str,
        f: &mlua::Function,
        args: impl mlua::IntoLuaMulti,
    ) -> Result<R, PolicyError> {
        self.invoke_timed(name, hook, f, args).0
    }

    /// [`Vm::invoke`], and how long the call took.
    pub fn invoke_timed<R: mlua::FromLuaMulti>(
        &self,
        name: &Rc<str>,
        hook: &str,
        f: &mlua::Function,
        args: impl mlua::IntoLuaMulti,
    ) -> (Result<R, PolicyError>, Duration) {
        if !Rc::ptr_eq(&self.current.borrow(), name) {
            *self.current.borrow_mut() = name.clone();
        }
        // `init` runs as the plugin loads: it has a load's time (see `Vm::script`).
        let time = if hook == "init" {
            self.limits.time.max(LOAD_TIME)
        } else {
            self.limits.time
        };
        let (result, took) = self.guarded_for(time, || f.call(args));
        let result = result.map_err(|e| PolicyError {
            plugin: name.to_string(),
            hook: hook.into(),
            message: clean(&e),
        });
        (result, took)
    }

    /// Runs `f` with a fresh budget and `time` as its time limit, and says how long it took
    /// (the clock read for the budget's deadline is its start: a hook call reads the clock
    /// twice in all); after a failure, frees what the call left behind.
    fn guarded_for<T>(
        &self,
        time: Duration,
        f: impl FnOnce() -> mlua::Result<T>,
    ) -> (mlua::Result<T>, Duration) {
        let started = Instant::now();
        self.budget.set(Budget {
            left: self.limits.instructions as i64,
            deadline: started + time,
        });
        let result = f();
        let took = started.elapsed();
        if result.is_err() {
            let _ = self.lua.gc_collect();
        }
        (result, took)
    }
}

/// The least time limit of loading a script (its top-level code).
const LOAD_TIME: Duration = Duration::from_secs(2);

/// The sandbox, in Lua: called once per VM with the host table and a function saying whether
/// the running call's budget is spent; returns the function that makes each plugin's
/// environment.
///
/// - Globals are the plugin's own (`_G` is its environment): the safe base functions, and
///   read-only copies of `string`, `table`, `math`, `utf8` and the `gemgate` host table. A view's
///   `pairs` walks a private copy and never hands out a table behind it; its metatable is
///   protected, and `rawset` on it changes only that plugin's view.
/// - The strings' shared metatable is protected too: `getmetatable("")` says nothing.
/// - `pcall` and `xpcall` give back an error that the instruction budget or the time limit
///   raised: a plugin cannot catch it and run on. A message handler is not called for such an
///   error (Lua would run it with its hooks off), and no table may have a `__gc` metamethod
///   (finalizers run with hooks off too).
const SANDBOX: &str = r#"
local host, spent = ...
local real = _G
local setmetatable, pairs, ipairs, next, type, error, rawget =
  setmetatable, pairs, ipairs, next, type, error, rawget
local pcall, xpcall = pcall, xpcall
-- Nothing here compiles code at run time or reaches outside, even for the host's own chunks.
real.load, real.loadfile, real.dofile, real.string.dump = nil, nil, nil, nil
getmetatable("").__metatable = false
local function deny() error("the gemgate table and the libraries are read-only", 2) end
local function readonly(t)
  local copy = {}
  for k, v in pairs(t) do
    if type(v) == "table" then v = readonly(v) end
    copy[k] = v
  end
  return setmetatable({}, {
    __index = copy,
    __newindex = deny,
    __len = function() return #copy end,
    __pairs = function()
      local k
      return function()
        local v
        k, v = next(copy, k)
        return k, v
      end
    end,
    __metatable = false,
  })
end
local function rethrow(ok, ...)
  if not ok and spent() then error((...), 0) end
  return ok, ...
end
local function safe_pcall(f, ...) return rethrow(pcall(f, ...)) end
-- A message handler runs where the error was raised; raised by the budget's hook, that is
-- where Lua runs no hooks, so the plugin's handler is not called for it.
local function safe_xpcall(f, handler, ...)
  return rethrow(xpcall(f, function(e)
    if spent() then return e end
    return handler(e)
  end, ...))
end
-- Lua runs finalizers with its hooks off: a `__gc` could loop with no budget at all.
local function safe_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in plugins", 2)
  end
  return setmetatable(t, mt)
end
local base = { "assert", "error", "ipairs", "next", "pairs", "select", "tonumber", "tostring",
  "type", "setmetatable", "getmetatable", "rawequal", "rawlen", "rawget", "rawset", "_VERSION" }
local libraries = { "string", "table", "math", "utf8" }
return function()
  local env = {}
  for _, name in ipairs(base) do env[name] = real[name] end
  for _, name in ipairs(libraries) do env[name] = readonly(real[name]) end
  env.pcall, env.xpcall, env.setmetatable = safe_pcall, safe_xpcall, safe_setmetatable
  env.gemgate = readonly(host)
  env._G = env
  return env
end
"#;

/// The first line of an error: Lua's own message with its `file:line:`, without the traceback.
fn clean(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return clean(cause),
        mlua::Error::MemoryError(_) => return "memory limit exceeded".into(),
        other => other.to_string(),
    };
    text.lines().next().unwrap_or_default().trim().to_owned()
}

/// A handle on one counter, as `gemgate.counter(name)` returns it.
pub(crate) struct CounterHandle {
    counters: Arc<dyn CounterStore>,
    plugin: Rc<str>,
    name: String,
    /// The counter itself, once looked up.
    slot: RefCell<Option<Arc<dyn CounterSlot>>>,
}

impl CounterHandle {
    /// Runs `f` on the counter, looking it up on first use (and again if it was dropped).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&dyn CounterSlot) -> R) -> mlua::Result<R> {
        if let Some(slot) = &*self.slot.borrow()
            && !slot.is_dropped()
        {
            return Ok(f(slot.as_ref()));
        }
        let slot = self
            .counters
            .slot(&self.plugin, &self.name, crate::clock::now_ms())
            .map_err(mlua::Error::runtime)?;
        let result = f(slot.as_ref());
        *self.slot.borrow_mut() = Some(slot);
        Ok(result)
    }
}

impl UserData for CounterHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method(
            "incr",
            |_, this, (n, window_s): (Option<i64>, Option<f64>)| {
                this.with(|slot| slot.incr(n.unwrap_or(1), window_s, &crate::clock::now_ms))
            },
        );
        methods.add_method("get", |_, this, ()| {
            let now = crate::clock::now_ms();
            // Reading never makes a counter: without a kept slot, look the name up.
            Ok(match &*this.slot.borrow() {
                Some(slot) if !slot.is_dropped() => slot.get(now),
                _ => this.counters.get(&this.plugin, &this.name, now),
            })
        });
    }
}

/// The `gemgate` host table: log, clock, JSON, hashing, counters, settings and the decision
/// constructors.
fn host_table(lua: &Lua, h: Host, current: Rc<RefCell<Rc<str>>>) -> mlua::Result<Table> {
    let host = lua.create_table()?;
    let counters = h.counters;
    host.set(
        "counter",
        lua.create_function(move |_, name: String| {
            Ok(CounterHandle {
                counters: counters.clone(),
                plugin: current.borrow().clone(),
                name,
                slot: RefCell::default(),
            })
        })?,
    )?;
    host.set("settings", lua.to_value(&h.settings)?)?;
    host.set("log", log_table(lua)?)?;
    host.set(
        "now_ms",
        lua.create_function(|_, ()| Ok(crate::clock::now_ms()))?,
    )?;
    host.set("json", json_table(lua)?)?;
    host.set(
        "hash",
        lua.create_function(|_, s: mlua::String| {
            let digest = Sha256::digest(s.as_bytes());
            Ok(i64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) & i64::MAX)
        })?,
    )?;
    set_decisions(lua, &host)?;
    Ok(host)
}

/// `gemgate.log`: `info`, `warn` and `error`, each naming the plugin line that logged.
fn log_table(lua: &Lua) -> mlua::Result<Table> {
    use tracing::Level;
    let log = lua.create_table()?;
    for (name, level) in [
        ("info", Level::INFO),
        ("warn", Level::WARN),
        ("error", Level::ERROR),
    ] {
        let f = lua.create_function(move |lua, m: String| {
            // Name the plugin (and its line) that logged.
            let at = lua
                .inspect_stack(1, |d| {
                    let s = d.source();
                    format!(
                        "{}:{}",
                        s.short_src.as_deref().unwrap_or("?"),
                        d.current_line().unwrap_or(0)
                    )
                })
                .unwrap_or_default();
            match level {
                Level::ERROR => tracing::error!(target: "gemgate::plugin", at = %at, "{m}"),
                Level::WARN => tracing::warn!(target: "gemgate::plugin", at = %at, "{m}"),
                _ => tracing::info!(target: "gemgate::plugin", at = %at, "{m}"),
            }
            Ok(())
        })?;
        log.set(name, f)?;
    }
    Ok(log)
}

/// `gemgate.json`: `encode` and `decode`.
fn json_table(lua: &Lua) -> mlua::Result<Table> {
    let json = lua.create_table()?;
    json.set(
        "encode",
        lua.create_function(|lua, v: Value| {
            let v: serde_json::Value = lua.from_value(v)?;
            Ok(v.to_string())
        })?,
    )?;
    json.set(
        "decode",
        lua.create_function(|lua, s: String| {
            let v: serde_json::Value = serde_json::from_str(&s).map_err(mlua::Error::external)?;
            lua.to_value(&v)
        })?,
    )?;
    Ok(json)
}

/// A decision table of `kind`, as the decision constructors make them.
fn decision(lua: &Lua, kind: &str) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("decision", kind)?;
    Ok(t)
}

/// The decision constructors: `deny`, `rewrite`, `retry`, `cool` and `disable`.
fn set_decisions(lua: &Lua, host: &Table) -> mlua::Result<()> {
    // Decisions are plain tables tagged with `decision`; the host reads them back.
    host.set(
        "deny",
        lua.create_function(|lua, (status, message): (u16, String)| {
            let t = decision(lua, "deny")?;
            t.set("status", status)?;
            t.set("message", message)?;
            Ok(t)
        })?,
    )?;
    host.set(
        "rewrite",
        lua.create_function(|_, t: Table| {
            t.set("decision", "rewrite")?;
            Ok(t)
        })?,
    )?;
    host.set(
        "retry",
        lua.create_function(|lua, ()| decision(lua, "retry"))?,
    )?;
    host.set(
        "cool",
        lua.create_function(|lua, seconds: f64| {
            let t = decision(lua, "cool")?;
            t.set("seconds", seconds)?;
            Ok(t)
        })?,
    )?;
    host.set(
        "disable",
        lua.create_function(|lua, reason: String| {
            let t = decision(lua, "disable")?;
            t.set("reason", reason)?;
            Ok(t)
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, code: &str) -> PluginSource {
        PluginSource {
            name: name.into(),
            path: PathBuf::from(format!("plugins/{name}.lua")),
            code: code.into(),
        }
    }

    fn vm() -> Vm {
        Vm::new(Limits {
            instructions: 200_000,
            time: Duration::from_millis(200),
            memory_bytes: 4 * 1024 * 1024,
        })
        .unwrap()
    }

    #[test]
    fn model_patterns_match_whole_names() {
        for (pattern, model, want) in [
            ("gemini-2.5-flash", "gemini-2.5-flash", true),
            ("gemini-2.5-flash", "gemini-2.5-flash-lite", false),
            ("*-search", "gemini-2.5-flash-search", true),
            ("*-search", "gemini-2.5-flash-search-x", false),
            ("gemini-2.5-*", "gemini-2.5-pro", true),
            ("gemini-2.5-*", "gemini-2.0-flash", false),
            ("gemini-*-pro*", "gemini-2.5-pro-preview", true),
            ("gemini-*-pro*", "gemini-2.5-flash", false),
            ("*", "", true),
            ("ab*b", "ab", false),
            ("a*a", "a", false),
        ] {
            assert_eq!(model_matches(pattern, model), want, "{pattern} ~ {model}");
        }
    }

    #[test]
    fn models_must_be_a_list_of_names() {
        let vm = vm();
        let p = vm
            .load(&source(
                "m",
                "return { name = 'm', models = { 'models/gemini-2.5-pro', '*-search' } }",
            ))
            .unwrap();
        assert_eq!(
            p.models.as_deref(),
            Some(&["gemini-2.5-pro".to_owned(), "*-search".to_owned()][..])
        );
        assert!(
            vm.load(&source("n", "return { name = 'n' }"))
                .unwrap()
                .models
                .is_none()
        );
        for bad in ["'gemini'", "{ 1 }", "{ '' }"] {
            let e = vm
                .load(&source(
                    "b",
                    &format!("return {{ name = 'b', models = {bad} }}"),
                ))
                .unwrap_err();
            assert!(
                e.message.contains("`models` must be a list"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn the_sandbox_has_no_way_out() {
        let vm = vm();
        let p = vm
            .load(&source("probe", "return { name = 'probe', on_request = function() return type(io), type(os), type(require), type(load), type(dofile), type(string.dump), type(gemgate.json) end }"))
            .unwrap();
        let seen: (String, String, String, String, String, String, String) =
            vm.call(&p, "on_request", ()).unwrap();
        assert_eq!(
            seen,
            (
                "nil".into(),
                "nil".into(),
                "nil".into(),
                "nil".into(),
                "nil".into(),
                "nil".into(),
                "table".into()
            )
        );
    }

    #[test]
    fn plugins_keep_their_own_globals_and_cannot_change_the_host_table() {
        let vm = vm();
        let a = vm
            .load(&source(
                "a",
                "x = 'mine' return { name = 'a', on_log = function() return x end }",
            ))
            .unwrap();
        let b = vm
            .load(&source(
                "b",
                "return { name = 'b', on_log = function() return tostring(x) end, \
                 on_error = function() gemgate.now_ms = nil end, \
                 on_request = function() gemgate.settings.extra = 1 end }",
            ))
            .unwrap();
        assert_eq!(vm.call::<String>(&a, "on_log", ()).unwrap(), "mine");
        assert_eq!(vm.call::<String>(&b, "on_log", ()).unwrap(), "nil");
        for hook in ["on_error", "on_request"] {
            let err = vm.call::<()>(&b, hook, ()).unwrap_err();
            assert!(err.message.contains("read-only"), "{err}");
        }
    }

    #[test]
    fn budgets_hold_through_pcall_and_xpcall() {
        let vm = vm();
        let p = vm
            .load(&source(
                "escape",
                "local function spin() while true do end end \
                 return { name = 'escape', \
                   on_request = function() while true do pcall(spin) end end, \
                   on_error = function() while true do xpcall(spin, function(e) return e end) end end, \
                   on_log = function() \
                     while true do xpcall(spin, function() while true do end end) end end, \
                   select_key = function() \
                     setmetatable({}, { __gc = function() while true do end end }) end, \
                   filter_models = function() return pcall(error, 'mine') end }",
            ))
            .unwrap();
        for hook in ["on_request", "on_error", "on_log"] {
            let started = Instant::now();
            let err = vm.call::<()>(&p, hook, ()).unwrap_err();
            assert!(err.message.contains("budget"), "{hook}: {err}");
            assert!(started.elapsed() < Duration::from_secs(2), "{hook}");
        }
        let err = vm.call::<()>(&p, "select_key", ()).unwrap_err();
        assert!(err.message.contains("__gc"), "{err}");
        // An error of the plugin's own is still caught as usual.
        let (ok, message): (bool, String) = vm.call(&p, "filter_models", ()).unwrap();
        assert!(!ok && message == "mine");
    }

    #[test]
    fn the_host_table_and_libraries_cannot_be_reached_or_changed() {
        let vm = vm();
        let probe = vm
            .load(&source(
                "probe",
                "return { name = 'probe', \
                   on_request = function() \
                     local f, state = pairs(gemgate) \
                     local seen = 0 \
                     for k, v in pairs(gemgate) do seen = seen + 1 end \
                     return type(state), getmetatable(gemgate), getmetatable(''), seen end, \
                   on_error = function() rawset(gemgate, 'now_ms', function() return 1 end) \
                     rawset(string, 'rep', function() return 'x' end) \
                     _G.shared_secret = 'mine' x = 1 return gemgate.now_ms() end, \
                   on_log = function() return setmetatable(gemgate, {}) end }",
            ))
            .unwrap();
        let other = vm
            .load(&source(
                "other",
                "return { name = 'other', on_request = function() \
                   return gemgate.now_ms() > 1, string.rep('ab', 2), tostring(shared_secret), \
                     tostring(x), ('y'):rep(2) end }",
            ))
            .unwrap();
        let (state, meta, string_meta, seen): (String, Value, Value, i64) =
            vm.call(&probe, "on_request", ()).unwrap();
        assert_eq!(state, "nil", "pairs hands out no table");
        assert_eq!(meta, Value::Boolean(false));
        assert_eq!(string_meta, Value::Boolean(false));
        assert!(seen > 5, "pairs still lists the host table: {seen}");
        assert_eq!(vm.call::<i64>(&probe, "on_error", ()).unwrap(), 1);
        assert!(vm.call::<Value>(&probe, "on_log", ()).is_err());
        let seen: (bool, String, String, String, String) =
            vm.call(&other, "on_request", ()).unwrap();
        assert_eq!(
            seen,
            (true, "abab".into(), "nil".into(), "nil".into(), "yy".into()),
            "one plugin's changes stay its own"
        );
    }

    #[test]
    fn declared_limits_are_checked_when_loaded_and_read_again_after_init() {
        let vm = vm();
        let load = |code: &str| vm.load(&source("lim", code));
        let p = load(
            "return { name = 'lim', limits = { per_client_rpm = 5, clients = { bob = 50 } } }",
        )
        .unwrap();
        let limit = p.limits.clone().unwrap();
        assert_eq!((limit.rpm_for("alice"), limit.rpm_for("bob")), (5, 50));
        assert_eq!(
            load("return { name = 'lim', limits = {} }").unwrap().limits,
            None
        );
        for (bad, says) in [
            ("limits = 3", "must be a table"),
            ("limits = { per_client_rpm = -1 }", "0 or more"),
            ("limits = { per_client_rpm = 1.5 }", "whole number"),
            ("limits = { per_client_rpm = 'many' }", "whole number"),
            ("limits = { per_client_rmp = 5 }", "per_client_rmp"),
            (
                "limits = { clients = { a = 1 } }",
                "needs `limits.per_client_rpm`",
            ),
            (
                "limits = { per_client_rpm = 5, clients = 3 }",
                "map client names",
            ),
        ] {
            let err = load(&format!("return {{ name = 'lim', {bad} }}")).unwrap_err();
            assert!(err.message.contains(says), "{bad}: {err}");
        }
        // Set by `init` from the plugin's settings.
        let mut p = load(
            "local l = {} return { name = 'lim', limits = l, init = function(c) l.per_client_rpm = c.n end }",
        )
        .unwrap();
        assert_eq!(p.limits, None);
        let conf = vm.lua().create_table().unwrap();
        conf.set("n", 7).unwrap();
        vm.call::<()>(&p, "init", &conf).unwrap();
        p.reread_models().unwrap();
        assert_eq!(p.limits.map(|l| l.per_client_rpm), Some(7));
    }

    #[test]
    fn plugins_declare_name_priority_and_hooks() {
        let vm = vm();
        let p = vm.load(&source("pin", "return { name = 'pin', priority = 100, select_key = function(pool) return 'k1' end }")).unwrap();
        assert_eq!(
            (p.priority, p.enabled, p.hooks.clone()),
            (100, true, vec!["select_key"])
        );
        let err = vm
            .load(&source("other", "return { name = 'pin' }"))
            .unwrap_err();
        assert!(err.message.contains("other.lua"), "{err}");
        let err = vm
            .load(&source("bad", "return { name = 'bad', on_request = 3 }"))
            .unwrap_err();
        assert!(err.message.contains("on_request"), "{err}");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let vm = vm();
        let err = vm
            .load(&source("broken", "return {\n name = 'broken',\n x = = 1 }"))
            .unwrap_err();
        assert!(err.message.contains("plugins/broken.lua:3:"), "{err}");
        let p = vm
            .load(&source(
                "oops",
                "return { name = 'oops', on_log = function()\n  local t = nil\n  return t.x\nend }",
            ))
            .unwrap();
        let err = vm.call::<()>(&p, "on_log", ()).unwrap_err();
        assert_eq!((err.plugin.as_str(), err.hook.as_str()), ("oops", "on_log"));
        assert!(err.message.contains("plugins/oops.lua:3:"), "{err}");
    }

    #[test]
    fn runaway_scripts_are_stopped_and_the_vm_keeps_working() {
        let vm = vm();
        let p = vm
            .load(&source(
                "bad",
                "return { name = 'bad', on_request = function() while true do end end, \
                 on_error = function() local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) end end, \
                 on_log = function() return 42 end }",
            ))
            .unwrap();
        let err = vm.call::<()>(&p, "on_request", ()).unwrap_err();
        assert!(err.message.contains("instruction budget"), "{err}");
        let err = vm.call::<()>(&p, "on_error", ()).unwrap_err();
        assert!(
            err.message.contains("memory") || err.message.contains("budget"),
            "{err}"
        );
        assert_eq!(vm.call::<i64>(&p, "on_log", ()).unwrap(), 42);
    }

    #[test]
    fn slow_calls_hit_the_time_limit() {
        let vm = Vm::new(Limits {
            instructions: u64::MAX / 2,
            time: Duration::from_millis(20),
            ..Limits::default()
        })
        .unwrap();
        let p = vm
            .load(&source(
                "slow",
                "return { name = 'slow', on_request = function() while true do end end }",
            ))
            .unwrap();
        let started = Instant::now();
        let err = vm.call::<()>(&p, "on_request", ()).unwrap_err();
        assert!(err.message.contains("time limit"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Loading (and `init`) is bounded by the instruction budget; its clock allows a busy
    /// machine's stalls, which a hook's few milliseconds do not.
    #[test]
    fn loading_has_more_time_than_a_hook_call() {
        let vm = Vm::new(Limits {
            instructions: 50_000_000,
            time: Duration::from_millis(1),
            ..Limits::default()
        })
        .unwrap();
        let busy = "local n = 0 for i = 1, 2000000 do n = n + i end";
        let p = vm
            .load(&source(
                "busy",
                &format!(
                    "{busy} return {{ name = 'busy', init = function() {busy} end, \
                     on_request = function() {busy} end }}"
                ),
            ))
            .unwrap();
        // `init` runs as the plugin loads, with a load's time.
        vm.call::<()>(&p, "init", ()).unwrap();
        let err = vm.call::<()>(&p, "on_request", ()).unwrap_err();
        assert!(err.message.contains("time limit"), "{err}");
    }

    #[test]
    fn the_host_table_builds_decisions_and_speaks_json() {
        let vm = vm();
        let p = vm
            .load(&source(
                "host",
                "return { name = 'host', on_request = function(req) \
                   local v = gemgate.json.decode(gemgate.json.encode({ a = req.n })) \
                   if v.a > 1 then return gemgate.deny(429, 'slow down') end \
                   return gemgate.rewrite{ model = 'm-' .. gemgate.hash('x') % 10 } end }",
            ))
            .unwrap();
        let req = vm.lua().create_table().unwrap();
        req.set("n", 2).unwrap();
        let d: Table = vm.call(&p, "on_request", req.clone()).unwrap();
        assert_eq!(d.get::<String>("decision").unwrap(), "deny");
        assert_eq!(d.get::<u16>("status").unwrap(), 429);
        req.set("n", 1).unwrap();
        let d: Table = vm.call(&p, "on_request", req).unwrap();
        assert_eq!(d.get::<String>("decision").unwrap(), "rewrite");
        assert!(d.get::<String>("model").unwrap().starts_with("m-"));
    }

    #[test]
    fn reads_only_lua_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.lua"), "return { name = 'b' }").unwrap();
        std::fs::write(dir.path().join("a.lua"), "return { name = 'a' }").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let names: Vec<String> = read_dir(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
