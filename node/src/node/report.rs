//! The status report: what the event loop answers [`super::Command::Status`] with (and so
//! `GET /v1/status`, `GET /metrics`, the dashboard and `shoal status`).

use super::event_loop::EventLoop;
use crate::status::{MemberReport, NodeReport, StatusReport, ViewReport};

impl EventLoop {
    /// The node's status as of now.
    pub(super) fn status(&self) -> StatusReport {
        let now = self.now_ms();
        let view = self.membership.view();
        let members = self
            .membership
            .members()
            .map(|m| MemberReport {
                id: m.id.to_string(),
                incarnation: m.incarnation,
                state: m.state,
                in_view: view.contains(&m.id),
                last_heard_ms_ago: now.saturating_sub(m.last_heard_ms),
                caps: m.caps.clone(),
                addrs: m.addrs.clone(),
                view_epoch: m.their_view.0,
                view_hash: m.their_view.1.to_hex(),
            })
            .collect();
        StatusReport {
            node: NodeReport {
                id: self.peer_id.to_base58(),
                incarnation: self.membership.incarnation(),
                api: self.api_addr.to_string(),
                listen: self.announced_addrs(),
                caps: self.membership.local_capabilities().clone(),
                uptime_ms: now,
                connected_peers: self.swarm.connected_peers().count(),
                connections: self
                    .swarm
                    .network_info()
                    .connection_counters()
                    .num_established(),
                private_network: self.cfg.control.swarm_key.is_some(),
                data_plane: Some(crate::status::DataPlaneReport {
                    addr: self.data_plane.local_addr().to_string(),
                    transport: self.data_plane.transport(),
                    stats: self.data_plane.stats(),
                }),
                memory: crate::status::ProcessMemory::now(),
            },
            view: ViewReport {
                epoch: view.epoch,
                hash: view.hash.to_hex(),
                members: view.ids().map(|i| i.to_string()).collect(),
            },
            members,
            counters: self.counters.clone(),
            jobs: self.jobs.reports(),
            serving: self.server.report(),
            serve_stats: Some(self.server.stats()),
        }
    }
}
