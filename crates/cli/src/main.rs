//! `optoutctl`: parses the command line and hands it to the library.

use std::process::ExitCode;

use clap::Parser;
use optout_cli::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await.map_err(anyhow::Error::from) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
