//! Builds the kernel programs (ebpf/) with the nightly toolchain and embeds
//! the object; see ../shared/ENVIRONMENT.md for the toolchain recipe and
//! `cargo xtask setup` for installing it.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "llm-egress-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
