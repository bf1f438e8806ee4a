//! Builds the guest payload as a bare-metal ELF and embeds it in `vmm`.
//!
//! A nested `cargo build` compiles `guest-payload`'s binary for the host target with a
//! generated linker script, static non-PIE linking, no start files and panic=abort. It
//! uses its own target directory so it never waits on the lock of the outer build.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    // A build script fails by exiting non-zero; cargo shows what it printed to stderr.
    if let Err(why) = build() {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
}

/// The evader zoo: every `configs/evaders/*.json`, by file stem, embedded so that the
/// directory is the zoo's one list (`shaping/evader.rs` includes what this writes).
fn write_evader_zoo(manifest_dir: &std::path::Path, out_dir: &std::path::Path) -> Result<(), String> {
    let dir = manifest_dir.join("../configs/evaders");
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    let mut members: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("read {}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let path = path
                .canonicalize()
                .map_err(|e| format!("resolve {}: {e}", path.display()))?;
            println!("cargo:rerun-if-changed={}", path.display());
            members.push((stem, path));
        }
    }
    members.sort();
    let mut text = String::from("&[\n");
    for (name, path) in members {
        text.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    text.push_str("]\n");
    let out = out_dir.join("evader_zoo.rs");
    std::fs::write(&out, text).map_err(|e| format!("write {}: {e}", out.display()))
}

fn build() -> Result<(), String> {
    let cargo_var = |name: &str| env::var_os(name).ok_or_else(|| format!("cargo did not set {name}"));
    let manifest_dir = PathBuf::from(cargo_var("CARGO_MANIFEST_DIR")?);
    let payload_dir = manifest_dir.join("../guest-payload");
    let out_dir = PathBuf::from(cargo_var("OUT_DIR")?);
    for watched in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", payload_dir.join(watched).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    write_evader_zoo(&manifest_dir, &out_dir)?;

    // The load address comes from the ABI, defined once in guest-payload.
    let linker_script = out_dir.join("guest-payload.ld");
    std::fs::write(&linker_script, linker_script_text())
        .map_err(|e| format!("write the guest linker script {}: {e}", linker_script.display()))?;

    let target_dir = out_dir.join("guest-target");
    // No SSE: KVM's instruction emulator (which runs every guest instruction on a software
    // KVM) does not implement most SSE instructions, and the compiler emits them for plain
    // struct copies. The payload does no floating point, so the float ABI is unaffected;
    // rustc warns that disabling sse2 on x86-64 is being phased out, hence the check in
    // `vm::loader`'s tests that the payload really holds no XMM instruction.
    let codegen_options = [
        "target-feature=-sse,-sse2".to_string(),
        "panic=abort".to_string(),
        "relocation-model=static".to_string(),
        "link-arg=-nostartfiles".to_string(),
        "link-arg=-nostdlib".to_string(),
        "link-arg=-static".to_string(),
        "link-arg=-no-pie".to_string(),
        "link-arg=-Wl,--build-id=none".to_string(),
        format!("link-arg=-T{}", linker_script.display()),
    ];
    let rustflags: Vec<String> = codegen_options
        .iter()
        .flat_map(|option| ["-C".to_string(), option.clone()])
        .collect();
    let rustflags = rustflags.join("\x1f");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "--bin",
            "guest-payload",
            "--features",
            "bare-metal",
        ])
        .arg("--manifest-path")
        .arg(payload_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // What the outer build set for itself (clippy's wrapper, coverage flags, a profile's
    // options) must not leak into the payload's build.
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PROFILE_") {
            command.env_remove(key);
        }
    }
    let status = command
        .status()
        .map_err(|e| format!("run cargo to build the guest payload: {e}"))?;
    if !status.success() {
        return Err(format!("building the guest payload failed: {status}"));
    }

    let elf = target_dir.join("release/guest-payload");
    let embedded = out_dir.join("guest-payload.elf");
    std::fs::copy(&elf, &embedded).map_err(|e| format!("copy {}: {e}", elf.display()))?;
    println!("cargo:rustc-env=VMM_GUEST_PAYLOAD_ELF={}", embedded.display());
    Ok(())
}

/// The payload's linker script, generated from the ABI (the SDK ships the same text).
fn linker_script_text() -> String {
    guest_payload::sdk::linker_script()
}
