//! `vmm trace`: the life of one CPUID, step by step, on each path. This file runs the
//! traced measurements and prints; what a trace says is worked out and drawn in
//! `crate::report::trace`.

use super::run::shaping;
use super::CommandError;
use crate::cli::TraceArgs;
use crate::experiment::Session;
use crate::measure::RunSpec;
use crate::modes::Path;
use crate::report::trace::{life, render, svg, CpuidLife};
use crate::shaping::latency::Shaping;
use crate::vm::loader::Payload;
use crate::vm::trace::Recorder;
use crate::vm::vcpu::RegisterAccess;
use guest_payload::Probe;
use serde::Serialize;

#[derive(Serialize)]
struct TraceReport {
    schema_version: u32,
    host: crate::host::HostInfo,
    register_access: Option<RegisterAccess>,
    paths: Vec<CpuidLife>,
    refused: Vec<(String, String)>,
}

pub fn trace(args: &TraceArgs) -> Result<(), CommandError> {
    let session = Session::open(Payload::embedded()?, crate::detector::Calibration::uncalibrated());
    let paths: Vec<Path> = if args.all {
        Path::ALL.to_vec()
    } else {
        vec![Path::new(args.mode, args.trap)]
    };
    let svg_file = super::create_output(args.svg.as_deref())?;
    let (mut lives, mut refused, mut access) = (Vec::new(), Vec::new(), None);
    for path in paths {
        let spec = RunSpec {
            // One path: its shaping as asked, refused where the VMM sees no exit (as `run`
            // refuses it). Every path: shaping where the VMM handles the exit, and the
            // others say that they ran unshaped.
            shaping: if !args.all || path.vmm_handles_cpuid() {
                shaping(&args.shaping, session.tsc.khz)?
            } else {
                Shaping::None
            },
            iterations: 1,
            warmup: args.warmup,
            cpuid_leaf: args.leaf,
            cpuid_subleaf: args.subleaf,
            probes: Probe::Cpuid.bit(),
            // What the guest got back, on every path (natively too): the snapshot's leaves.
            snapshot: true,
            timeout: std::time::Duration::from_secs_f64(args.timeout),
            ..RunSpec::new(path)
        };
        // Each repeat a fresh VM; the median trace kept whole (its parts add up).
        let mut traced: Vec<CpuidLife> = Vec::new();
        let mut refusal = None;
        for _ in 0..args.repeat {
            let mut recorder = Recorder::default();
            match session
                .measurer
                .measure_traced(&session.payload, &spec, None, &mut recorder)
            {
                Ok(measurement) => {
                    access = access.or(measurement.register_access);
                    let sample = measurement
                        .results
                        .samples
                        .get(&Probe::Cpuid)
                        .and_then(|s| s.first().copied())
                        .unwrap_or_default();
                    let mut life = life(path, &spec, sample, &recorder, measurement.register_access);
                    life.guest_got = measurement.results.cpuid.clone();
                    let asked = shaping(&args.shaping, session.tsc.khz)?;
                    if asked != Shaping::None && spec.shaping == Shaping::None {
                        life.note.push_str(&format!(
                            " Ran without the {} shaping asked: no exit of this path reaches the VMM.",
                            asked.kind()
                        ));
                    }
                    traced.push(life);
                }
                Err(error) if args.all && error.is_refusal() => {
                    refusal = Some(super::cli_message(&error));
                    break;
                }
                Err(error) => return Err(error.into()),
            }
        }
        if let Some(why) = refusal {
            refused.push((path.name().to_owned(), why));
            continue;
        }
        traced.sort_by_key(|l| l.guest_visible_cycles);
        let range = (
            traced.first().map_or(0, |l| l.guest_visible_cycles),
            traced.last().map_or(0, |l| l.guest_visible_cycles),
        );
        let count = traced.len();
        if let Some(mut median) = traced.into_iter().nth(count / 2) {
            median.traces = count as u32;
            median.guest_visible_range = range;
            lives.push(median);
        }
    }
    if args.json {
        let report = TraceReport {
            schema_version: crate::report::SCHEMA_VERSION,
            host: session.host.clone(),
            register_access: access,
            paths: lives.clone(),
            refused: refused.clone(),
        };
        super::print(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        super::print(&render(&lives, &refused, &session.host))?;
    }
    if let Some(output) = svg_file {
        super::commit(output, svg(&lives, &refused).as_bytes())?;
    }
    Ok(())
}
