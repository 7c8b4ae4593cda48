//! The `tern` command: serve, check a config, manage accounts.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tern::config::Config;
use tern::store::accounts::AccountStore;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern: XMPP push and remote-control relay server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults when no config file is given).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective configuration (secrets redacted).
    CheckConfig { file: PathBuf },
    /// Manage the embedded account store.
    User {
        #[command(subcommand)]
        action: UserAction,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add an account (or replace its password). JID as `user@domain` or just `user`.
    Add {
        jid: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account.
    Remove { jid: String },
    /// List accounts.
    List,
}

// WIP-MAIN
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            init_logging(&config.log.level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the Tokio runtime")?;
            rt.block_on(tern::server::run(config))?;
            Ok(())
        }
        Command::CheckConfig { file } => {
            let config = Config::load(Some(&file))?;
            println!("# {} is valid; effective configuration:", file.display());
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
        Command::User { action, config } => {
            let config = Config::load(config.as_deref())?;
            let store = AccountStore::open(&config.server.data_dir)?;
            let domain = &config.server.domain;
            match action {
                UserAction::Add {
                    jid,
                    password_stdin,
                } => {
                    let jid = qualify(&jid, domain)?;
                    let password = read_password(password_stdin)?;
                    store.add(&jid, &password, config.auth.scram_iterations)?;
                    println!("added {jid}");
                }
                UserAction::Remove { jid } => {
                    let jid = qualify(&jid, domain)?;
                    if !store.remove(&jid)? {
                        bail!("no account {jid}");
                    }
                    println!("removed {jid}");
                }
                UserAction::List => {
                    for jid in store.list() {
                        println!("{jid}");
                    }
                }
            }
            Ok(())
        }
    }
}

/// `alice` → `alice@domain`; a JID of another domain is refused (this server serves only `domain`).
fn qualify(jid: &str, domain: &str) -> anyhow::Result<String> {
    let full = if jid.contains('@') {
        jid.to_string()
    } else {
        format!("{jid}@{domain}")
    };
    let parsed = jid::BareJid::new(&full).with_context(|| format!("`{jid}` is not a valid JID"))?;
    if parsed.node().is_none() {
        bail!("`{jid}` has no user part; use user@{domain}");
    }
    if parsed.domain().as_str() != domain {
        bail!(
            "`{jid}` is not in this server's domain `{domain}` (set [server] domain or TIGASE_DOMAIN)"
        );
    }
    Ok(parsed.to_string())
}

fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !from_stdin && stdin.is_terminal() {
        eprint!("password: ");
        std::io::stderr().flush().ok();
        // Hide the echo while typing.
        let _echo = EchoOff::new();
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        eprintln!();
        return non_empty(line);
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    non_empty(line)
}

fn non_empty(line: String) -> anyhow::Result<String> {
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

/// Turns terminal echo off for its lifetime.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> Self {
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return EchoOff(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            EchoOff(Some(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}
