//! `draft`: the command line. Everything but the start-up is in the library (`lib.rs`).

use std::process::ExitCode;

use clap::Parser;
use draft_cli::{Cli, device};

fn main() -> ExitCode {
    // First, while the process has one thread (it sets an environment variable).
    device::quiet_headless_wayland();
    match draft_cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
