//! `palisade`: the command line. Every command is one API call to the agent; errors are one
//! line on stderr and a non-zero exit. The same program is installed as `kubectl-palisade`,
//! so that on a node `kubectl palisade status` runs it as a kubectl plugin.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line tool: its output and its errors are what it prints"
)]

mod commands;
mod output;
mod prefilter;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use commands::{Cli, run};

/// The name kubectl finds a plugin by: `kubectl palisade ...` runs `kubectl-palisade ...`.
pub const KUBECTL_PLUGIN: &str = "kubectl-palisade";

/// Whether this process was started under the plugin's name (kubectl execs it by its path).
fn invoked_as_kubectl_plugin() -> bool {
    std::env::args_os().next().is_some_and(|arg0| {
        std::path::Path::new(&arg0)
            .file_name()
            .is_some_and(|name| name == KUBECTL_PLUGIN)
    })
}

/// The whole program, for both binaries.
pub fn main() -> ExitCode {
    let mut command = Cli::command();
    if invoked_as_kubectl_plugin() {
        // Help and usage then read as the user typed them.
        command = command.bin_name("kubectl palisade");
    }
    let matches = command.get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("palisade: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, &matches)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("palisade: {e:#}");
            ExitCode::FAILURE
        }
    }
}
