//! `vmm inspect FILE`: what the VMM sees in a payload before it runs it — the ELF's
//! segments and entry, the declaration, every CPUID site the decoder finds, and what each
//! path would do with it. It reads the file only: nothing boots.

use super::{load_payload, CommandError};
use crate::cli::InspectArgs;
use crate::measure::{self, RunSpec};
use crate::modes::Path;
use crate::vm::loader::Payload;
use guest_payload::{capabilities, ABI_VERSION};
use serde::Serialize;
use std::fmt::Write;

#[derive(Serialize)]
struct SegmentReport {
    addr: u64,
    mem_size: u64,
    file_size: u64,
    executable: bool,
}

#[derive(Serialize)]
struct SiteReport {
    addr: u64,
    /// The symbol at the site, where the symbol table names one.
    symbol: Option<String>,
}

#[derive(Serialize)]
struct Declaration {
    name: String,
    /// False where the magic is not the SDK's: the rest is then not a declaration.
    magic_ok: bool,
    abi_version: u32,
    capabilities: Vec<String>,
}

#[derive(Serialize)]
struct PathPlan {
    path: &'static str,
    runs: bool,
    /// What the path does with this payload, or why it refuses it.
    what: String,
}

#[derive(Serialize)]
struct InspectReport {
    payload: String,
    entry: u64,
    entry_symbol: Option<String>,
    segments: Vec<SegmentReport>,
    /// `None`: the payload declares nothing (no `vmm_payload_info`).
    declaration: Option<Declaration>,
    vmm_abi_version: u32,
    cpuid_sites: Vec<SiteReport>,
    /// The TSC reads an evader's RDTSC trap would trap: more than four, and
    /// `--tsc-trap hw-breakpoint` cannot.
    rdtsc_sites: Vec<u64>,
    rdtscp_sites: Vec<u64>,
    paths: Vec<PathPlan>,
}

pub fn inspect(args: &InspectArgs) -> Result<(), CommandError> {
    let payload = load_payload(Some(&args.file))?;
    let report = report(&payload);
    if args.json {
        super::print(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        super::print(&render(&report))?;
    }
    Ok(())
}

fn report(payload: &Payload) -> InspectReport {
    let declaration = payload.info.map(|info| {
        let known = capabilities::NAMES.iter().fold(0, |all, (bit, _)| all | bit);
        Declaration {
            name: payload.declared_name().unwrap_or_default(),
            magic_ok: info.magic == guest_payload::PAYLOAD_INFO_MAGIC,
            abi_version: info.abi_version,
            capabilities: capabilities::NAMES
                .iter()
                .filter(|(bit, _)| info.capabilities & bit != 0)
                .map(|&(_, name)| name.to_owned())
                .chain(
                    (info.capabilities & !known != 0)
                        .then(|| format!("unknown bits {:#x}", info.capabilities & !known)),
                )
                .collect(),
        }
    });
    let sites = payload.cpuid_sites.len();
    let rdtscp = payload.declares(capabilities::RDTSCP);
    let paths = Path::ALL
        .into_iter()
        .map(|path| {
            let refusal = measure::preflight(payload, &RunSpec::new(path)).err();
            let what = match (&refusal, path) {
                (Some(error), _) => format!("refused: {}", super::cli_message(error)),
                (None, Path::Native) => match measure::native_twin(payload) {
                    Ok(Some(twin)) => format!("runs the native twin {} pinned to one host CPU", twin.display()),
                    _ => "runs the embedded timing core in a pinned host thread".to_owned(),
                },
                (None, Path::HwAssist) => format!("boots it; KVM answers its {sites} CPUID site(s) in the kernel"),
                (None, Path::TrapEmulate(trap)) => match trap.patch() {
                    None => format!(
                        "arms {sites} of the 4 debug registers (DR0-DR3) on its CPUID sites; the code is untouched"
                    ),
                    Some(patch) => format!(
                        "patches all {sites} CPUID site(s) from 0f a2 to {:02x} {:02x} and emulates CPUID at each trap",
                        patch[0], patch[1]
                    ),
                },
                (None, Path::Paravirt) => {
                    "boots it asking for hypercalls (VMM_FLAG_PARAVIRT_CPUID), which it declares it honours".to_owned()
                }
            };
            let what = if refusal.is_none() && rdtscp && path != Path::Native {
                format!("{what}; it executes rdtscp, so the run first probes that this KVM can run rdtscp in a guest")
            } else {
                what
            };
            PathPlan {
                path: path.name(),
                runs: refusal.is_none(),
                what,
            }
        })
        .collect();
    InspectReport {
        payload: payload.source.to_string(),
        entry: payload.entry,
        entry_symbol: payload.symbol_at(payload.entry).map(str::to_owned),
        segments: payload
            .segments
            .iter()
            .map(|s| SegmentReport {
                addr: s.addr,
                mem_size: s.mem_size,
                file_size: s.file_size,
                executable: s.executable,
            })
            .collect(),
        declaration,
        vmm_abi_version: ABI_VERSION,
        cpuid_sites: payload
            .cpuid_sites
            .iter()
            .map(|&addr| SiteReport {
                addr,
                symbol: payload.symbol_at(addr).map(str::to_owned),
            })
            .collect(),
        rdtsc_sites: payload.tsc_sites.rdtsc.clone(),
        rdtscp_sites: payload.tsc_sites.rdtscp.clone(),
        paths,
    }
}

fn render(report: &InspectReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "payload {}", report.payload);
    let entry_symbol = report
        .entry_symbol
        .as_deref()
        .map_or(String::new(), |s| format!(" ({s})"));
    let _ = writeln!(out, "ELF64 x86-64 executable, entry {:#x}{entry_symbol}", report.entry);
    match &report.declaration {
        Some(d) => {
            if !d.magic_ok {
                let _ = writeln!(
                    out,
                    "vmm_payload_info has the wrong magic: not the SDK's declaration (every path refuses it)"
                );
            }
            let abi = if d.abi_version == report.vmm_abi_version {
                format!("ABI {}", d.abi_version)
            } else {
                format!(
                    "ABI {} (this vmm speaks {}: rebuild it)",
                    d.abi_version, report.vmm_abi_version
                )
            };
            let caps = if d.capabilities.is_empty() {
                "none".to_owned()
            } else {
                d.capabilities.join(", ")
            };
            let _ = writeln!(out, "declares \"{}\", {abi}, capabilities: {caps}", d.name);
        }
        None => {
            let _ = writeln!(out, "declares nothing (no vmm_payload_info symbol)");
        }
    }
    let _ = writeln!(out, "\nsegment          mem bytes  file bytes  flags");
    for s in &report.segments {
        let _ = writeln!(
            out,
            "{:#010x} {:>15} {:>11}  {}",
            s.addr,
            s.mem_size,
            s.file_size,
            if s.executable { "executable" } else { "data" }
        );
    }
    let _ = writeln!(
        out,
        "\nCPUID sites found by decoding the executable segments: {}",
        report.cpuid_sites.len()
    );
    for site in &report.cpuid_sites {
        let symbol = site.symbol.as_deref().map_or(String::new(), |s| format!("  {s}"));
        let _ = writeln!(out, "  {:#010x}{symbol}", site.addr);
    }
    let (rdtsc, rdtscp) = (report.rdtsc_sites.len(), report.rdtscp_sites.len());
    let _ = writeln!(
        out,
        "\nRDTSC sites: {rdtsc}, RDTSCP sites: {rdtscp} (what an evader's RDTSC trap traps; \
         --tsc-trap hw-breakpoint takes at most four, io-patch any number)"
    );
    let _ = writeln!(out, "\nwhat each path would do:");
    for plan in &report.paths {
        let _ = writeln!(out, "  {:<28} {}", plan.path, plan.what);
    }
    out
}
