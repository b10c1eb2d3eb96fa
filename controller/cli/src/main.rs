//! `palisade`: see the library.

fn main() -> std::process::ExitCode {
    palisade_cli::main()
}
