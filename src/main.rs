//! The `guestd` binary: `run` (the daemon), `emulator` (the Genesys guest chat emulator) and
//! `demo` (scripted chats against the embedded emulator).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use guestd::config::Config;
use guestd::emulator::{Emulator, EmulatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Exit status when guestd stopped with events it could not deliver (EX_TEMPFAIL): the journal
/// keeps every undelivered `ended`, and the next start writes it.
const EXIT_UNDELIVERED: i32 = 75;

#[derive(Parser)]
#[command(
    name = "guestd",
    version,
    about = "Supervises Genesys Cloud guest chat sessions and reports when and why each ends."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty, env = "GUESTD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: commands on stdin and HTTP, events as JSON lines on stdout.
    Run {
        /// Configuration file (TOML); defaults apply without one. Keys can be overridden with
        /// GUESTD_<SECTION>__<KEY> environment variables.
        #[arg(long, short, env = "GUESTD_CONFIG")]
        config: Option<PathBuf>,
        /// Leave every chat on SIGTERM/SIGINT instead of keeping it for the next start.
        #[arg(long)]
        leave_on_shutdown: bool,
    },
    /// Serve the guest chat emulator (REST + websocket + /emulator admin API).
    Emulator {
        /// Address to listen on; repeat to serve on several (eventStreamUri rotates over them).
        #[arg(long, default_values_t = vec![SocketAddr::from(([127, 0, 0, 1], 8780))])]
        listen: Vec<SocketAddr>,
        /// Emulator settings (TOML, keys of EmulatorConfig; see docs/emulator.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run scripted chats against the embedded emulator, one per end reason, and print a summary.
    Demo {
        /// Print every event line, not only the summary.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        events: bool,
    },
    /// Is a conversation still alive? Asks the running guestd's HTTP API (which answers from its
    /// own view, the Platform API or the guest API), else the Platform API or guest API directly.
    /// Prints the status as JSON; exits 0 when it was answered.
    Status {
        /// The conversation id.
        conversation_id: String,
        /// Configuration file (for the HTTP API's address and token, and `[platform]`).
        #[arg(long, short, env = "GUESTD_CONFIG")]
        config: Option<PathBuf>,
        /// Name of an environment variable holding the chat's jwt (never a flag: flags show in
        /// process lists).
        #[arg(long)]
        jwt_env: Option<String>,
    },
    /// Check a configuration file and print the effective configuration.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short, env = "GUESTD_CONFIG")]
        config: Option<PathBuf>,
        /// The file is an emulator configuration (`guestd emulator --config`).
        #[arg(long)]
        emulator: bool,
    },
}

/// Ask a running guestd over its HTTP API; None when none answers at `control.http_listen`.
async fn status_via_daemon(
    cfg: &Config,
    conversation_id: &str,
    jwt: Option<&str>,
) -> anyhow::Result<Option<(bool, String)>> {
    if cfg.control.http_listen.is_empty() {
        return Ok(None);
    }
    let url = format!(
        "http://{}/v1/conversations/{conversation_id}/status",
        cfg.control.http_listen
    );
    let mut req = reqwest::Client::new().get(url);
    if let Some(token) = cfg.control.bearer_token().map_err(anyhow::Error::msg)? {
        req = req.bearer_auth(token.expose());
    }
    if let Some(jwt) = jwt {
        req = req.header("x-guest-chat-jwt", jwt);
    }
    match req.send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            Ok(Some((ok, r.text().await.unwrap_or_default())))
        }
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// An emulator configuration file, or the defaults.
fn load_emulator_config(path: Option<PathBuf>) -> anyhow::Result<EmulatorConfig> {
    Ok(match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => EmulatorConfig::default(),
    })
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Pretty => builder.with_ansi(false).init(),
    }
}

/// SIGTERM and SIGINT handlers, installed when this is created (before any work starts, so a
/// signal that arrives early is not the default action that kills the process mid-write).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn wait(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One socket per session: take the whole hard limit of open files.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    match cli.cmd {
        Cmd::Run {
            config,
            leave_on_shutdown,
        } => {
            let mut signals = Signals::install()?;
            let mut cfg = Config::load(config.as_deref()).context("loading configuration")?;
            cfg.shutdown.leave_on_shutdown |= leave_on_shutdown;
            let stdin = cfg.control.stdin.then(tokio::io::stdin);
            let running =
                guestd::daemon::start(cfg, guestd::events::StdSink::new(std::io::stdout()), stdin)
                    .await
                    .context("starting guestd")?;
            let sig = signals.wait().await;
            tracing::info!(signal = sig, "signal received");
            let report = running.shutdown().await;
            tracing::info!(
                sessions = report.sessions,
                drained = report.drained,
                delivered = report.delivered,
                "stopped"
            );
            // Exit now: the runtime would otherwise wait for the blocking thread that reads
            // stdin, which may never see EOF. 75 (EX_TEMPFAIL) when events could not be
            // delivered: the journal holds them for the next start.
            std::process::exit(if report.delivered {
                0
            } else {
                EXIT_UNDELIVERED
            })
        }
        Cmd::Emulator { listen, config } => {
            let mut signals = Signals::install()?;
            let cfg = load_emulator_config(config)?;
            for addr in listen.iter().filter(|a| !a.ip().is_loopback()) {
                // Anyone who can reach it can end chats and inject faults: say so.
                tracing::warn!(
                    %addr,
                    "the emulator listens off loopback; its admin API (/emulator/...) has no \
                     authentication: anyone who can reach this address can end chats and inject faults"
                );
            }
            let emu = Emulator::start_multi(cfg, &listen)
                .await
                .with_context(|| format!("listening on {listen:?}"))?;
            eprintln!(
                "guestd emulator on {} (admin API under /emulator/)",
                emu.base_url()
            );
            let sig = signals.wait().await;
            tracing::info!(signal = sig, "signal received");
            emu.shutdown();
            Ok(())
        }
        Cmd::Demo { events } => {
            let ok = guestd::demo::run(events).await?;
            if !ok {
                anyhow::bail!("the demo did not see the expected end reasons");
            }
            Ok(())
        }
        Cmd::Status {
            conversation_id,
            config,
            jwt_env,
        } => {
            let cfg = Config::load(config.as_deref()).context("loading configuration")?;
            let jwt = jwt_env
                .map(|name| std::env::var(&name).with_context(|| format!("reading ${name}")))
                .transpose()?;
            let answer = status_via_daemon(&cfg, &conversation_id, jwt.as_deref()).await?;
            let (ok, body) = match answer {
                Some(a) => a,
                None if let Some(r) = guestd::ends::in_journal(&cfg, &conversation_id) => {
                    // No guestd running: the end it remembered in its journal.
                    let s = guestd::status::ConversationStatus::remembered(r);
                    (true, serde_json::to_string(&s)?)
                }
                None => {
                    // No guestd running: ask the platform (or the guest API) directly.
                    let roots = cfg.genesys.extra_roots().map_err(anyhow::Error::msg)?;
                    let api = guestd::daemon::guest_api(&cfg, &roots)?;
                    let platform = guestd::daemon::platform_api(&cfg, &roots)?;
                    match guestd::status::status_from(
                        None,
                        platform.as_ref(),
                        &api,
                        &conversation_id,
                        jwt.map(guestd::secret::Secret::new),
                    )
                    .await
                    {
                        Ok(s) => (true, serde_json::to_string(&s)?),
                        Err(e) => (
                            false,
                            serde_json::json!({"error": e.to_string(), "code": e.code()})
                                .to_string(),
                        ),
                    }
                }
            };
            println!("{body}");
            if ok { Ok(()) } else { std::process::exit(1) }
        }
        Cmd::CheckConfig {
            config,
            emulator: true,
        } => {
            let cfg = load_emulator_config(config)?;
            println!(
                "{}",
                toml::to_string_pretty(&cfg).context("printing configuration")?
            );
            Ok(())
        }
        Cmd::CheckConfig { config, .. } => {
            let cfg = Config::load(config.as_deref()).context("loading configuration")?;
            println!(
                "{}",
                toml::to_string_pretty(&cfg).context("printing configuration")?
            );
            Ok(())
        }
    }
}
