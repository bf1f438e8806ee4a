//! One timing CPU per run across processes: two `vmm` processes started together never
//! time on one CPU without saying so (issue 18). Native runs only: no /dev/kvm needed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn vmm_in(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm"));
    command.env("VMM_LOCK_DIR", dir);
    command
}

fn allowed_cpus() -> Vec<usize> {
    vmm::host::allowed_cpus()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_run_on_a_taken_cpu_takes_another_waits_or_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("vmm-test-cpulock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cpus = allowed_cpus();
    let last = *cpus.last().unwrap();
    // The first process: a long native run on the last CPU.
    let first = Killed(
        vmm_in(&dir)
            .args([
                "run",
                "--mode",
                "native",
                "-n",
                "5000000",
                "--warmup",
                "0",
                "--cpu",
                &last.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lock = dir.join(format!("vmm-cpu-{last}.lock"));
    let started = Instant::now();
    let pid = first.0.id().to_string();
    while std::fs::read_to_string(&lock).unwrap_or_default() != pid {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first run never took CPU {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Told to fail: refused, naming the CPU and the process.
    let refused = vmm_in(&dir)
        .args([
            "--cpu-lock",
            "fail",
            "run",
            "--mode",
            "native",
            "-n",
            "100",
            "--cpu",
            &last.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains(&format!(
            "CPU {last} is being timed on by another vmm process (pid {pid})"
        )),
        "{message}"
    );

    // No --cpu: another CPU, where there is one.
    if cpus.len() > 1 {
        let other = vmm_in(&dir)
            .args(["run", "--mode", "native", "-n", "100"])
            .output()
            .unwrap();
        assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
        let text = String::from_utf8_lossy(&other.stdout);
        assert!(
            !text.contains(&format!("on host CPU {last}\n")) && text.contains("on host CPU "),
            "{text}"
        );
    }

    // The same CPU asked for, by default: it says it waits, and runs once the first is done.
    let mut waiting = vmm_in(&dir)
        .args(["run", "--mode", "native", "-n", "100", "--cpu", &last.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(waiting.try_wait().unwrap().is_none(), "it did not wait");
    drop(first);
    let output = waiting.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("waiting for it"), "{message}");
    std::fs::remove_dir_all(&dir).ok();
}
