//! Gossip in the event loop: a message on the control topic goes to the core's acceptance
//! decision ([`coordinator_free::gossip::admit`]); this applies it: reports the verdict to
//! gossipsub, counts it, logs what deserves it and carries out the action (dial a member,
//! keep an NCCL id, start a job, hand a model announcement to the server). Also the NCCL
//! ids this node mints and waits for.

use super::event_loop::EventLoop;
use crate::train::job::JobSpec;
use coordinator_free::gossip::{self, Acceptance, Admission, Forgery, Tally};
use coordinator_free::{ControlMessage, NodeId};
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::PeerId;

impl EventLoop {
    /// Validates a gossiped message (gossipsub forwards it only once accepted) and acts on it.
    pub(super) fn on_gossip(&mut self, ev: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = ev
        else {
            return;
        };
        let now = self.now_ms();
        self.counters.control_bytes_received += message.data.len() as u64;
        // Strict signing guarantees `source` is the signed author.
        let author = message.source.and_then(|p| NodeId::new(p.to_base58()).ok());
        let admission = gossip::admit(
            &message.data,
            author.as_ref(),
            &mut self.membership,
            &self.jobs,
            now,
        );
        match admission.tally() {
            Tally::Accepted => self.counters.gossip_accepted += 1,
            Tally::Ignored => self.counters.gossip_ignored += 1,
            Tally::Rejected => self.counters.gossip_rejected += 1,
        }
        let verdict = match admission.acceptance() {
            Acceptance::Accept => MessageAcceptance::Accept,
            Acceptance::Ignore => MessageAcceptance::Ignore,
            Acceptance::Reject => MessageAcceptance::Reject,
        };
        self.apply(admission, &propagation_source, message.source, now);
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, verdict);
    }

    /// Carries out what an admitted message asks for, and logs the refused ones.
    fn apply(
        &mut self,
        admission: Admission<JobSpec>,
        from: &PeerId,
        author: Option<PeerId>,
        now: u64,
    ) {
        match admission {
            Admission::Heartbeat { id, addrs } => self.maybe_dial(&id, &addrs, now),
            Admission::NcclId { view_hash, id } => self.store_nccl_id(view_hash, id),
            Admission::Serve(a) => {
                let origin = a.origin.clone();
                self.server.on_announce(a, origin);
            }
            Admission::NewJob { run, resume, spec } => {
                if let Err(e) = self.start_job(spec, run, resume) {
                    tracing::error!("cannot start announced job: {e}");
                }
            }
            Admission::KnownJob { .. } | Admission::OtherView => {}
            Admission::Replayed { id, error } => {
                tracing::warn!(from = %from, author = %id, "rejected replayed heartbeat: {error}");
            }
            Admission::NotTaken { id, error } => {
                tracing::trace!(peer = %id, "ignored heartbeat: {error}");
            }
            Admission::Malformed(e) => {
                tracing::warn!(from = %from, author = ?author, "rejected gossip message: {e}");
            }
            Admission::InvalidJob(e) => {
                tracing::warn!(from = %from, author = ?author, "rejected job announcement: {e}");
            }
            Admission::Forged(Forgery::Heartbeat { claimed }) => {
                tracing::warn!(from = %from, author = ?author, claimed = %claimed, "rejected heartbeat for another peer");
            }
            Admission::Forged(Forgery::Serve { claimed }) => {
                tracing::warn!(from = %from, author = ?author, claimed = %claimed, "rejected model announcement for another peer");
            }
            Admission::Forged(Forgery::NcclId) => {
                tracing::warn!(from = %from, author = ?author, "rejected NCCL id not minted by the view's root");
            }
        }
    }

    /// Publishes the NCCL unique id of the current view; only its root may mint it.
    pub(super) fn publish_nccl_id(&mut self, id: Vec<u8>) -> Result<(), String> {
        let view = self.membership.view().clone();
        if coordinator_free::collective::nccl_root(&view) != Some(self.membership.me()) {
            return Err("only the view's smallest member id mints its NCCL id".into());
        }
        let msg = ControlMessage::NcclId {
            view_hash: view.hash,
            id: id.clone(),
        };
        let bytes = msg.encode().map_err(|e| e.to_string())?;
        self.store_nccl_id(view.hash, id);
        self.publish(bytes)
    }

    /// Keeps the NCCL id of the current view and hands it to whoever waits for it.
    fn store_nccl_id(&mut self, hash: coordinator_free::ViewHash, id: Vec<u8>) {
        for (_, w) in self.nccl_waiters.drain(..).filter(|(h, _)| *h == hash) {
            let _ = w.send(id.clone());
        }
        self.nccl_id = Some((hash, id));
    }
}
