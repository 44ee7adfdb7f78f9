//! The `gemgate` command: argument parsing and start-up only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gemgate::config;

#[derive(Parser)]
#[command(
    version,
    about = "A gateway for Google's Gemini API: one endpoint over many keys"
)]
struct Cli {
    /// The config file (TOML). Settings in the environment or `.env` override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config (file, `.env` and environment) and exit.
    Check {
        /// Also run the plugin tests (`*_test.lua` in the plugins folder).
        #[arg(long)]
        with_tests: bool,
    },
    /// Work with the Lua plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run the plugin tests (`*_test.lua`) of the plugins folder in use, or of DIR.
    Test {
        /// A plugins folder; its plugins are the ones tested.
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let path = cli
        .config
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let vars = config::gather_env(std::path::Path::new("."));
    let source = gemgate::app::reload::Source::new(path, explicit);
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gemgate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { with_tests } => {
            let checked = check(&config);
            if checked != ExitCode::SUCCESS || !with_tests {
                return checked;
            }
            plugin_test(&config, config.plugin_dir())
        }
        Command::Plugin {
            command: PluginCommand::Test { dir },
        } => plugin_test(&config, dir.or_else(|| config.plugin_dir())),
        Command::Run => run(config, source, &vars),
    }
}

/// `gemgate check`: compiles the plugins and templates of `config` and says what it found.
fn check(config: &config::Config) -> ExitCode {
    let pool = gemgate::keys::KeyPool::new(
        &config.keys,
        &Default::default(),
        config.max_failures,
        &config.quota,
    );
    let policy = match gemgate::policy::engine::Policy::compile(
        config,
        0,
        std::sync::Arc::new(pool),
        std::sync::Arc::new(gemgate::policy::counters::Counters::default()),
        Default::default(),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gemgate: invalid plugin: {e}");
            return ExitCode::from(2);
        }
    };
    let templates = match gemgate::templates::Templates::load(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gemgate: invalid {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "templates OK: {} from {}",
        templates
            .files
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        templates
            .dir
            .as_ref()
            .map_or("built-in".into(), |d| d.display().to_string())
    );
    let plugins: Vec<String> = policy
        .enabled()
        .map(|p| format!("{} ({})", p.name, p.priority))
        .collect();
    println!(
        "plugins OK: {} from {}",
        plugins.join(", "),
        policy
            .dir()
            .map_or("built-in".into(), |d| d.display().to_string())
    );
    println!(
        "configuration OK: {} (listen {}, {} keys, {} client tokens, upstream {}{})",
        config
            .path
            .as_ref()
            .map_or("embedded defaults".into(), |p| p.display().to_string()),
        config.listen,
        config.keys.len(),
        config.tokens.len(),
        config.base_url.authority,
        config.base_url.path,
    );
    ExitCode::SUCCESS
}

/// `gemgate plugin test`: runs the plugin tests of `dir` (`None`: the built-in plugins') and
/// prints a line per test; fails if any test does.
fn plugin_test(config: &config::Config, dir: Option<PathBuf>) -> ExitCode {
    match gemgate::policy::testing::test_folder(config, dir.as_deref()) {
        Ok(report) => {
            print!("{}", report.text());
            if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("gemgate: invalid plugin: {e}");
            ExitCode::from(2)
        }
    }
}

/// `gemgate run`: serves until SIGTERM; the exit status says why it stopped.
fn run(
    config: config::Config,
    source: gemgate::app::reload::Source,
    vars: &std::collections::BTreeMap<String, String>,
) -> ExitCode {
    for name in config::env::IGNORED {
        if vars.contains_key(*name) {
            eprintln!(
                "gemgate: note: {name} is ignored; gemgate keeps its state in {}",
                config.data_dir.display()
            );
        }
    }
    gemgate::alloc::tune();
    gemgate::telemetry::init(&config.log_level, config.file.server.log_format == "json");
    let result = gemgate::run(config, source);
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    gemgate::telemetry::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(e.exit_code()),
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off as the binary loads: before `main`, before the allocator's
/// own constructor (constructors of a lower priority number run first; 0 to 100 are the C
/// library's) and before the first allocation, whose touch of a fresh arena would otherwise
/// make a whole 2 MiB page resident for the life of the process (idle RSS 19.2 MiB with it,
/// 18.4-18.6 without).
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00101")]
static NO_HUGE_PAGES: extern "C" fn() = {
    extern "C" fn at_load() {
        gemgate::alloc::no_huge_pages();
    }
    at_load
};
