//! The data plane's roster: the current view and where each member's data plane listens,
//! from the addresses members announce in their heartbeats
//! ([`coordinator_free::DataPlaneAddr`]).

use super::event_loop::EventLoop;
use crate::data_plane::Roster;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::net::IpAddr;

/// The IP a multiaddr reaches (its first `/ip4` or `/ip6` part), if any.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl EventLoop {
    /// Remembers the IP a peer's control-plane connection comes from (`remote`: the
    /// connection's remote address), for a data-plane address it announces with an
    /// unspecified IP; the roster is rebuilt when that tells something new of a member of
    /// the view.
    pub(super) fn note_remote_ip(&mut self, peer: PeerId, remote: &Multiaddr) {
        let Some(ip) = ip_of(remote) else {
            return;
        };
        if self.remote_ips.insert(peer, ip) == Some(ip) {
            return;
        }
        let in_view = coordinator_free::NodeId::new(peer.to_base58())
            .is_ok_and(|id| self.membership.view().contains(&id));
        if in_view {
            self.update_roster();
        }
    }

    /// Gives the data plane the current view and the members' data-plane addresses.
    /// Members running another transport are left out (with a warning), and so are
    /// members announcing an unspecified IP whose connection's IP is not known.
    pub(super) fn update_roster(&mut self) {
        let view = self.membership.view().clone();
        let mine = self.data_plane.transport();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ip_of_a_connection_address() {
        let ip = |s: &str| ip_of(&s.parse().unwrap());
        assert_eq!(
            ip("/ip4/192.168.1.9/tcp/4001"),
            Some("192.168.1.9".parse().unwrap())
        );
        assert_eq!(
            ip("/ip6/fe80::1/udp/4001/quic-v1"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(ip("/dns4/example.org/tcp/4001"), None);
    }
}
