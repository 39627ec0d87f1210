//! The serve registry's side of the event loop: the server learns the view and the
//! members' capabilities from here, and the models it holds are announced to the swarm
//! from here (an announcement means "I hold it"): at once when offered
//! ([`super::NodeHandle::offer_model`]), and again at every re-announcement tick.

use super::event_loop::EventLoop;
use coordinator_free::codec::ServeAnnounce;
use coordinator_free::{ControlMessage, NodeId};
use std::collections::HashMap;

impl EventLoop {
    /// Tells the server the view and the members' capabilities.
    pub(super) fn update_serving_members(&self) {
        let mut caps: HashMap<NodeId, coordinator_free::Capabilities> = self
            .membership
            .members()
            .map(|m| (m.id.clone(), m.caps.clone()))
            .collect();
        caps.insert(
            self.membership.me().clone(),
            self.membership.local_capabilities().clone(),
        );
        self.server
            .set_members(self.membership.view().clone(), caps);
    }

    /// Announces the models this node holds (an announcement means "I hold it").
    pub(super) fn announce_models(&mut self) {
        self.update_serving_members();
        for a in self.server.announcements() {
            if let Ok(bytes) = ControlMessage::Serve(a).encode() {
                let _ = self.publish(bytes);
            }
        }
    }

    /// Announces a model just offered on this node.
    pub(super) fn offer_model(&mut self, announce: ServeAnnounce) -> Result<(), String> {
        let bytes = ControlMessage::Serve(announce)
            .encode()
            .map_err(|e| e.to_string())?;
        self.publish(bytes)
    }
}
