//! `palisade-agent`: the engine wired to its edges (the `palisade_agent` library), running
//! until SIGINT/SIGTERM.

use clap::Parser as _;
use mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// The proxy allocates small, short-lived buffers per request; mimalloc's thread-local free
/// lists serve them far faster than glibc malloc (measured in docs/benchmarks/l7-proxy.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same in its v2 and v3); libmimalloc-sys has no
/// constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc give freed memory back to the kernel at once. Its delayed purge only runs when
/// the freeing thread allocates again, and the agent's threads often go idle right after a
/// burst (a blocking-pool thread after a state save, workers after a sync), so what they
/// freed stayed resident: the Kubernetes-scale benchmark's agent held 202 MiB with its pods
/// against 135 MiB purging at once (docs/benchmarks/kubernetes-scale.md).
fn purge_freed_memory_at_once() {
    // SAFETY: sets a global option of the allocator; any thread may, at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

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
    purge_freed_memory_at_once();
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
    use super::{MI_OPTION_PURGE_DELAY, one_line, purge_freed_memory_at_once};

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // The purge delay's default in the mimalloc built here (v3's options.c) is 1,000 ms:
        // that the number reads it says the number names the option.
        // SAFETY: reads a global option of the allocator.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(default, 1_000);
        }
        purge_freed_memory_at_once();
        // SAFETY: as above.
        let set = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(set, 0);
    }

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
