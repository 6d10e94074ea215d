//! The command lines of `filterd` and `filterctl` (clap definitions). They live in the library
//! so that `cargo xtask dist` can generate shell completions and man pages from them, and the
//! deployment test can hold the Kubernetes manifest to `filterd --help`. The binaries only
//! parse them and act.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{auth, dataplane, serve};

/// Default API address.
pub const DEFAULT_API: &str = "127.0.0.1:9405";

/// How filterd writes its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (journald, Loki, Elasticsearch).
    Json,
}

/// HTTP method firewall daemon: enforces allowed methods per path in the kernel and answers
/// violations with `405 Method Not Allowed`.
#[derive(Parser, Debug)]
#[command(name = "filterd", version, long_version = crate::LONG_VERSION)]
#[command(group(clap::ArgGroup::new("source").args(["policy", "state"])))]
pub struct Filterd {
    /// Interface to filter (repeatable): the classifiers go on its ingress and egress.
    #[arg(long = "iface", required_unless_present = "check")]
    pub ifaces: Vec<String>,
    /// TCP destination port carrying plaintext HTTP/1.x (repeatable).
    #[arg(long = "port", default_values_t = [80u16])]
    pub ports: Vec<u16>,
    /// The operator's policy, read-only: a TOML file, or a directory of *.toml files (a
    /// mounted ConfigMap). Never written. Watched: a new version is checked and applied, an
    /// invalid one is refused (the policy in force stays; the log and /v1/status say why). API
    /// writes are refused.
    #[arg(long, value_name = "FILE|DIR")]
    pub policy: Option<PathBuf>,
    /// The daemon's own policy state, API-owned: loaded at start (a missing file is an empty
    /// policy) and rewritten on every accepted API change (comments are not kept). Without
    /// --policy or --state the policy lives in memory only.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Seconds between looks at the --policy source for changes (0: only on SIGHUP).
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub watch_interval: u64,
    /// Check the policy (--policy or --state) and exit: 0 when valid, 1 with every error
    /// (file:line:column) when not. Loads nothing, needs no root.
    #[arg(long, requires = "source")]
    pub check: bool,
    /// TCP address of the REST API.
    #[arg(long, default_value = DEFAULT_API)]
    pub api: SocketAddr,
    /// Another name clients reach the API by (repeatable): requests whose Host is not the
    /// API's address (or localhost on loopback) or one of these are refused (DNS rebinding).
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// Also serve the REST API on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// File holding the API's bearer token; generated (mode 0600) if missing. It must belong
    /// to the user filterd runs as (root) and be readable by nobody else.
    #[arg(long, default_value = auth::DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// Serve the API without a token. Refused unless the API listens on loopback only.
    #[arg(long)]
    pub no_auth: bool,
    /// Count and log what would be rejected; block nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Detach the classifier when filterd exits (default: keep enforcing via pinned TCX links
    /// or netlink filters). With netlink tc a crash still leaves the filters attached.
    #[arg(long)]
    pub fail_open: bool,
    /// How to attach: TCX links (kernel 6.6 and later), netlink tc (clsact qdisc, cls_bpf
    /// filters; any kernel), or auto (TCX where the kernel has it, else netlink).
    #[arg(long, value_enum, default_value_t = dataplane::AttachChoice::Auto)]
    pub attach: dataplane::AttachChoice,
    /// bpffs directory for the pinned links and counters (bpffs is mounted at /sys/fs/bpf if
    /// it is not).
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Connections the classifier follows at once. When the table is full the least recently
    /// active connection's state is evicted, and that connection's next data segment is
    /// refused (503, backend reset): size it above the host's peak of concurrent connections.
    #[arg(long, default_value_t = filter_common::CONNS_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds after start during which connections already open (no state in the new
    /// classifier) are adopted at their next segment; afterwards a connection without state
    /// is one whose state was evicted, and its segment is refused.
    #[arg(long, default_value_t = dataplane::DEFAULT_ADOPT_WINDOW.as_secs())]
    pub adopt_window: u64,
    /// Seconds an API client may take to send a request's line and headers; a connection
    /// that has not (slowloris), or that stays idle that long, is closed.
    #[arg(long, default_value_t = serve::HEADER_READ_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub api_header_timeout: u64,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log the classifiers' own diagnostics (kernel side, cold paths only: a failed stage,
    /// packet rewrite or map insert, a lost event) under the target `filterd::kernel`. Off,
    /// the verifier removes them from the programs.
    #[arg(long)]
    pub bpf_log: bool,
}

/// Manage a running filterd: rules, status, explanations of decisions, the live feed of
/// refusals.
#[derive(Parser, Debug)]
#[command(name = "filterctl", version, long_version = crate::LONG_VERSION)]
pub struct Filterctl {
    /// Base URL of filterd's API.
    #[arg(long, default_value = "http://127.0.0.1:9405", global = true)]
    pub api: String,
    /// Talk to filterd over its Unix socket (filterd --api-socket) instead of --api.
    #[arg(long, value_name = "PATH", global = true)]
    pub api_socket: Option<PathBuf>,
    /// File holding the API token (filterd's --token-file).
    #[arg(long, default_value = auth::DEFAULT_TOKEN_FILE, global = true)]
    pub token_file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Check a policy file, or see what it would change.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show the verdict and responder counters.
    Stats,
    /// Show the daemon's status: interfaces, policy source, fail mode, revision.
    Status,
    /// Explain what the filter does with a request: the canonical path (or why it is
    /// refused), the rule that matched, the Allow set, the answer. Asks the daemon, or with
    /// --policy decides offline against a policy file.
    Explain(ExplainArgs),
    /// Follow refusals and monitor-mode hits as they happen (client, method, path, rule,
    /// answer); --json prints the feed's JSON lines.
    Events,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The request method, e.g. DELETE.
    pub method: String,
    /// The request target as a client sends it, e.g. '/api/%61dmin/../x?y'.
    pub target: String,
    /// A request header `Name: value` (repeatable), e.g. 'X-HTTP-Method-Override: DELETE'.
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// Decide offline against this policy (a file or a directory) instead of asking the
    /// daemon.
    #[arg(long, value_name = "FILE|DIR")]
    pub policy: Option<PathBuf>,
    /// Offline: as filterd --dry-run (every rule monitors).
    #[arg(long, requires = "policy")]
    pub dry_run: bool,
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// List the rules in force.
    List,
    /// Add or replace the rule for PATH.
    Add {
        path: String,
        #[arg(required = true)]
        methods: Vec<String>,
        /// Match the subtree under PATH (which must end in '/').
        #[arg(long)]
        prefix: bool,
        /// Count and log violations instead of blocking them.
        #[arg(long)]
        monitor: bool,
        /// Do not let GET imply HEAD.
        #[arg(long)]
        no_head: bool,
    },
    /// Remove the rule for PATH.
    Remove {
        path: String,
        /// Remove the prefix rule (default: the exact rule).
        #[arg(long)]
        prefix: bool,
    },
    /// Replace the whole policy (switches and rules) with a policy file (TOML).
    Replace {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check a policy file or directory offline: every error with file:line:column. Exit 0
    /// when valid, 1 when not.
    Check {
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR")]
        file: PathBuf,
    },
    /// Show what replacing the daemon's policy with FILE would change (the daemon answers a
    /// dry run; nothing changes). Exit 0 without differences, 1 with, 2 on trouble.
    Diff {
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR")]
        file: PathBuf,
    },
}

/// `filterd`'s command definition (completions, man page, the deployment test).
pub fn filterd_command() -> clap::Command {
    <Filterd as clap::CommandFactory>::command()
}

/// `filterctl`'s command definition.
pub fn filterctl_command() -> clap::Command {
    <Filterctl as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definitions_are_consistent() {
        filterd_command().debug_assert();
        filterctl_command().debug_assert();
    }

    #[test]
    fn check_needs_a_source_but_no_interface() {
        let ok = Filterd::try_parse_from(["filterd", "--check", "--policy", "p.toml"]).unwrap();
        assert!(ok.check && ok.ifaces.is_empty());
        assert!(Filterd::try_parse_from(["filterd", "--check"]).is_err());
        assert!(
            Filterd::try_parse_from(["filterd", "--port", "80"]).is_err(),
            "--iface"
        );
        assert!(
            Filterd::try_parse_from(["filterd", "--iface", "a", "--policy", "p", "--state", "s"])
                .is_err(),
            "one owner of the policy"
        );
    }
}
