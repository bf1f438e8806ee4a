//! The `vmm` command: parses the command line and hands each subcommand to
//! `vmm::commands`. Errors are printed as one line; the exit status is 0 on success, 1 when
//! a run or check failed, 2 for a bad command line (clap's).

use clap::Parser;
use std::process::ExitCode;
use vmm::cli::{Cli, Command};
use vmm::commands::{self, CommandError};
use vmm::doctor;

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::cpu_lock::set_policy(cli.cpu_lock);
    vmm::native::set_twin_user(cli.twin_user.clone());
    let result = match &cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Compare(args) => commands::compare::compare(args),
        Command::Calibrate(args) => commands::calibrate::calibrate(args),
        Command::Validate(args) => commands::validate::validate(args),
        Command::Merge(args) => commands::validate::merge(args),
        Command::Doctor(args) => doctor_command(args.json),
        Command::Inspect(args) => commands::inspect::inspect(args),
        Command::Trace(args) => commands::trace::trace(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Bounded, like the console: a stderr nobody reads does not hold the process;
            // and shown, not obeyed: an error may quote a file's text (a forged report's).
            let message = error.cli_message();
            vmm::console::say(&format!("vmm: error: {}\n", vmm::escape::terminal(&message)));
            ExitCode::from(error.exit_status())
        }
    }
}

fn doctor_command(json: bool) -> Result<(), CommandError> {
    let checks = doctor::run_checks();
    if json {
        commands::print(&(serde_json::to_string_pretty(&checks)? + "\n"))?;
    } else {
        commands::print(&doctor::render(&checks))?;
    }
    if doctor::all_passed(&checks) {
        Ok(())
    } else {
        Err(CommandError::DoctorFailed)
    }
}
