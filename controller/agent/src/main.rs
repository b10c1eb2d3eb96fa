//! `palisade-agent`: the engine wired to its edges (the `palisade_agent` library), running
//! until SIGINT/SIGTERM.

use clap::Parser as _;
use mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// The proxy allocates small, short-lived buffers per request; mimalloc's thread-local free
/// lists serve them far faster than glibc malloc (measured in docs/benchmarks/l7-proxy.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// The error and its causes on one line, each said once: the messages here include their
/// cause already, so a cause whose words its parent carries is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = palisade_agent::run::AgentArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PALISADE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match palisade_agent::run::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let line = one_line(&e);
            tracing::error!("{line}");
            #[expect(
                clippy::print_stderr,
                reason = "the fatal error is shown even when PALISADE_LOG filters the log out"
            )]
            {
                eprintln!("palisade-agent: {line}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::other("No such file or directory");
        let e = anyhow::Error::new(io)
            .context("bpffs at /sys/fs/bpf/x: No such file or directory")
            .context("cannot load the BPF datapath");
        assert_eq!(
            one_line(&e),
            "cannot load the BPF datapath: bpffs at /sys/fs/bpf/x: No such file or directory"
        );
    }
}
