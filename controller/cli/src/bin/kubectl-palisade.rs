//! `kubectl-palisade`: the same program as `palisade`, named for kubectl's plugin lookup.

fn main() -> std::process::ExitCode {
    palisade_cli::main()
}
