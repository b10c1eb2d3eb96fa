use clap::Parser as _;
use palisade_controller::cli::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
