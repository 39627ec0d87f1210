//! `shoal keygen`: writes a private-network swarm key, or creates (or loads) a data dir's
//! identity and prints its peer id.
//!
//! The identity is never replaced (see `shoal_node::identity`): run against the data dir
//! of a node that is running or starting, `keygen` prints that node's peer id, the one
//! dialers must use.

use crate::failure::{usage, Failure};
use crate::up::default_data_dir;
use clap::Args;
use shoal_node::identity;
use std::path::PathBuf;

#[derive(Args)]
pub struct KeygenArgs {
    /// Write a new private-network swarm key here (refuses to overwrite).
    #[arg(long, env = "SHOAL_SWARM_KEY")]
    swarm_key: Option<PathBuf>,
    /// Without --swarm-key: create (or load) the identity in this data dir and print its
    /// peer id; for the data dir of a running node, that node's id (an identity is never
    /// replaced). Default: $XDG_DATA_HOME/shoal or ~/.local/share/shoal.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// `shoal keygen`: a new swarm key (never over an existing file), or the data dir's peer
/// id.
pub fn keygen(a: KeygenArgs) -> Result<(), Failure> {
    match a.swarm_key {
        Some(p) => {
            let k = identity::write_new_swarm_key(&p).map_err(|e| usage(e.into()))?;
            println!(
                "wrote swarm key {} (fingerprint {})",
                p.display(),
                k.fingerprint()
            );
        }
        None => {
            let dir = a.data_dir.unwrap_or_else(default_data_dir);
            let k = identity::load_or_create_identity(&dir).map_err(|e| usage(e.into()))?;
            println!("{}", k.public().to_peer_id());
        }
    }
    Ok(())
}
