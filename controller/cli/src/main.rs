//! `palisade`: the command line. Every command is one API call to the agent; errors are one
//! line on stderr and a non-zero exit.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line tool: its output and its errors are what it prints"
)]

mod commands;
mod output;

use clap::{CommandFactory as _, FromArgMatches as _};
use commands::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli, &matches).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
