//! `shoal trace RUN_DIR`: assembles `RUN_DIR/trace.json` from the members'
//! `trace.<member>.jsonl` files there (a killed run, or members whose files were copied
//! from other machines), as the run does at its end.

use crate::failure::{usage, Failure};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct TraceArgs {
    /// The run directory (`runs/<job>`).
    run_dir: PathBuf,
}

/// Writes the run's `trace.json` and prints its path and member count.
pub fn trace(a: TraceArgs) -> Result<(), Failure> {
    if !a.run_dir.is_dir() {
        let dir = a.run_dir.display();
        return Err(usage(anyhow::anyhow!("{dir} is not a directory")));
    }
    let members = shoal_node::train::trace::assemble(&a.run_dir)
        .with_context(|| format!("cannot assemble the trace in {}", a.run_dir.display()))?;
    let path = a.run_dir.join(shoal_node::train::trace::TRACE_FILE);
    println!("wrote {} ({members} members)", path.display());
    Ok(())
}
