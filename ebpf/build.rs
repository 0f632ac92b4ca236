//! Re-run when bpf-linker changes, so that a relinked toolchain rebuilds the
//! object. Fails with a pointer to the setup command when it is missing.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => {
            println!("cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup`");
        }
    }
}
