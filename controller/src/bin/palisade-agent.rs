use clap::Parser as _;
use mimalloc::MiMalloc;
use palisade_controller::agent::{AgentArgs, run};
use tracing_subscriber::EnvFilter;

/// The proxy allocates small, short-lived buffers per request; mimalloc's thread-local free
/// lists serve them far faster than glibc malloc (measured in docs/benchmarks/l7-proxy.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = AgentArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PALISADE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("palisade-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
