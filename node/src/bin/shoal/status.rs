//! `shoal status`: asks a node's local API for its members, view and capabilities and
//! prints them as a table (or JSON).

use crate::failure::Failure;
use clap::Args;
use shoal_node::status;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Args)]
pub struct StatusArgs {
    /// The node's local API. Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
}

/// `shoal status`: one report, bounded by 5 s.
pub async fn status(a: StatusArgs) -> Result<(), Failure> {
    let r = status::fetch_status(a.api, Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::from)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(anyhow::Error::from)?
        );
    } else {
        print!("{}", status::render_table(&r));
    }
    Ok(())
}
