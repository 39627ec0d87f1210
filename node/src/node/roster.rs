//! The data plane's roster: the current view and where each member's data plane listens,
//! from the addresses members announce in their heartbeats
//! ([`coordinator_free::DataPlaneAddr`]).

use super::event_loop::EventLoop;
use crate::data_plane::{DataTransport, Roster};
use coordinator_free::Transport;
use libp2p::PeerId;
use std::collections::HashMap;

/// The core's name for a data-plane transport.
pub(super) fn core_transport(t: DataTransport) -> Transport {
    match t {
        DataTransport::Quic => Transport::Quic,
        DataTransport::Tcp => Transport::Tcp,
    }
}

impl EventLoop {
    /// Gives the data plane the current view and the members' data-plane addresses.
    /// Members running another transport are left out (with a warning), and so are
    /// members announcing an unspecified IP whose connection's IP is not known.
    pub(super) fn update_roster(&mut self) {
        let view = self.membership.view().clone();
        let mine = core_transport(self.data_plane.transport());
        let mut addrs = HashMap::new();
        addrs.insert(self.membership.me().clone(), self.data_plane.local_addr());
        for m in self.membership.members() {
            let Some(data_addr) = m.data_addr else {
                continue;
            };
            if data_addr.transport != mine {
                let transport = data_addr.transport;
                tracing::warn!(peer = %m.id, %transport, "member runs another data-plane transport");
                continue;
            }
            let seen =
                m.id.as_str()
                    .parse::<PeerId>()
                    .ok()
                    .and_then(|p| self.remote_ips.get(&p).copied());
            let Some(addr) = data_addr.resolve(seen) else {
                continue;
            };
            addrs.insert(m.id.clone(), addr);
        }
        self.data_plane.set_roster(Roster { view, addrs });
    }
}
