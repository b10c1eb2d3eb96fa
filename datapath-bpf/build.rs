use which::which;

/// Rebuild when bpf-linker changes: it is the linker of this crate, but cargo does not track it.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask install`");
        }
    }
}
