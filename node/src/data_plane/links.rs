//! Link bookkeeping: the roster (who may connect, where members listen) and the inbox.
//!
//! An inbound link is idle until its first operation header arrives; it is then filed by
//! `(peer, tag)`: handed to the collective waiting for it, or kept in `arrived` (at most
//! `max_pending_links`, the oldest dropped first) until that collective asks. A collective
//! that asks first waits in `waiting`, bounded by `start_timeout`. A new roster prunes
//! both: links of departed members or of another view are dropped (their senders see the
//! link close), and a waiter for a departed member is woken with [`DataPlaneError::Left`]
//! at once instead of at its bound; QUIC connections of departed members are closed, so
//! collectives blocked on them fail at once too.

use super::transport::Link;
use super::{DataPlane, DataPlaneError, Roster};
use coordinator_free::codec::data::{OpHeader, OP_HEADER_LEN};
use coordinator_free::collective::Kind;
use coordinator_free::NodeId;
use libp2p::PeerId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Inbound links filed by `(peer, tag)` and the collectives waiting for them.
#[derive(Default)]
pub(super) struct Inbox {
    /// Links whose first header arrived before their collective asked for them.
    arrived: HashMap<(NodeId, u64), (Link, OpHeader, Instant)>,
    /// Collectives waiting for a peer's first header, with their view's epoch.
    waiting: HashMap<(NodeId, u64), (Arrival, u64)>,
}

/// Where a waited-for link and its first header are handed over.
type Arrival = oneshot::Sender<(Link, OpHeader)>;

/// Acknowledgement codes sent back on a link after its header is checked.
/// Accepted (also the handshake's verdict for a member).
pub(super) const ACK_OK: u8 = 1;
/// The header names another view.
pub(super) const ACK_VIEW_MISMATCH: u8 = 2;
/// The header describes another operation (or a service nobody runs here).
pub(super) const ACK_OP_MISMATCH: u8 = 3;

impl DataPlane {
    /// Installs the current view and addresses. Links from non-members are refused from now
    /// on, pooled links to peers that left are closed, and links that arrived for
    /// collectives of another view are dropped (their senders see the link close).
    pub fn set_roster(&self, roster: Roster) {
        let members: Vec<NodeId> = roster.view.ids().cloned().collect();
        let hash = roster.view.hash;
        let roster_epoch = roster.view.epoch;
        *self.inner.roster.lock().unwrap() = Some(Arc::new(roster));
        self.inner
            .tcp_pool
            .lock()
            .unwrap()
            .retain(|peer, _| members.contains(peer));
        {
            let mut inbox = self.inner.inbox.lock().unwrap();
            inbox
                .arrived
                .retain(|(peer, _), (_, h, _)| members.contains(peer) && h.view_hash == hash);
            // A collective waiting for a first header fails now (its sender is dropped)
            // instead of at the start bound when its view is older than this one (its peers
            // abandon collectives of views they left, so the header may never come), or of
            // this view and waiting on a departed member. A newer view's collective keeps
            // waiting (this roster may lag behind).
            let epoch = roster_epoch;
            inbox
                .waiting
                .retain(|(peer, _), (_, e)| *e > epoch || (*e == epoch && members.contains(peer)));
        }
        // Close QUIC connections to members that left: collectives still waiting on them
        // fail at once instead of at their timeout (TCP links of a dead process are reset
        // by its kernel already). The map's lock is held across a dial; when it is busy,
        // the closing waits for it in a task rather than being skipped.
        let staying = members.clone();
        let close_departed = move |conns: &mut HashMap<NodeId, quinn::Connection>| {
            conns.retain(|peer, conn| {
                let keep = staying.contains(peer);
                if !keep {
                    conn.close(3u32.into(), b"left the view");
                }
                keep
            });
        };
        match self.inner.quic_conns.try_lock() {
            Ok(mut conns) => close_departed(&mut conns),
            Err(_) => {
                let d = self.clone();
                tokio::spawn(async move { close_departed(&mut *d.inner.quic_conns.lock().await) });
            }
        }
        let left: Vec<NodeId> = {
            let mut inbound = self.inner.quic_inbound.lock().unwrap();
            let gone: Vec<NodeId> = inbound
                .keys()
                .filter(|p| !members.contains(p))
                .cloned()
                .collect();
            for p in &gone {
                if let Some(c) = inbound.remove(p) {
                    c.close(3u32.into(), b"left the view");
                }
            }
            gone
        };
        if !left.is_empty() {
            tracing::debug!(?left, "closed data-plane connections of departed members");
        }
    }

    /// The installed roster, if any.
    pub(super) fn roster(&self) -> Option<Arc<Roster>> {
        self.inner.roster.lock().unwrap().clone()
    }

    /// Whether `peer` is in the installed roster's view.
    pub(super) fn is_member(&self, peer: &PeerId) -> bool {
        let Ok(id) = NodeId::new(peer.to_base58()) else {
            return false;
        };
        self.roster().is_some_and(|r| r.view.contains(&id))
    }

    /// Reads operation headers from an idle inbound link and files it in the inbox. Runs
    /// until the link closes; idle links close after 10 minutes.
    pub(super) async fn read_headers(&self, mut link: Link) {
        let mut buf = [0u8; OP_HEADER_LEN];
        match tokio::time::timeout(Duration::from_secs(600), link.r.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        match OpHeader::decode(&buf) {
            Ok(h) => match h.kind {
                Kind::Stream(service) => self.deliver_stream(link, service).await,
                _ => self.deliver(link, h),
            },
            Err(e) => tracing::warn!(peer = %link.peer, "bad data-plane header: {e}"),
        }
    }

    /// Files an inbound link whose first header arrived: to its waiting collective, or
    /// into `arrived`.
    fn deliver(&self, link: Link, h: OpHeader) {
        let key = (link.peer.clone(), h.tag);
        let mut inbox = self.inner.inbox.lock().unwrap();
        if let Some((tx, _)) = inbox.waiting.remove(&key) {
            if let Err((link, h)) = tx.send((link, h)) {
                // The waiter gave up in the meantime; keep the link for a retry.
                inbox.arrived.insert(key, (link, h, Instant::now()));
            }
            return;
        }
        if inbox.arrived.len() >= self.inner.cfg.max_pending_links {
            // Drop the oldest.
            if let Some(oldest) = inbox
                .arrived
                .iter()
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(k, _)| k.clone())
            {
                inbox.arrived.remove(&oldest);
            }
        }
        inbox.arrived.insert(key, (link, h, Instant::now()));
    }

    /// Why a wait for `peer`'s first header in a collective of view `epoch` cannot succeed
    /// under the current roster: the roster is of that view or a newer one and `peer` is
    /// not in it ([`DataPlaneError::Left`]), or the roster is of a newer view
    /// ([`DataPlaneError::Superseded`]).
    fn stale_wait(&self, peer: &NodeId, epoch: u64) -> Option<DataPlaneError> {
        let r = self.roster()?;
        if r.view.epoch >= epoch && !r.view.contains(peer) {
            Some(DataPlaneError::Left(peer.clone()))
        } else if r.view.epoch > epoch {
            Some(DataPlaneError::Superseded {
                peer: peer.clone(),
                epoch,
            })
        } else {
            None
        }
    }

    /// Waits for `peer`'s first header of collective `tag` in a view of `epoch`. Fails at
    /// once when this node has moved on to a view (of that epoch or later) without the peer,
    /// or when a roster without it arrives while waiting; otherwise within the start bound.
    pub(super) async fn wait_inbound(
        &self,
        peer: &NodeId,
        tag: u64,
        epoch: u64,
    ) -> Result<(Link, OpHeader), DataPlaneError> {
        let key = (peer.clone(), tag);
        let rx = {
            let mut inbox = self.inner.inbox.lock().unwrap();
            if let Some((link, h, _)) = inbox.arrived.remove(&key) {
                return Ok((link, h));
            }
            // Checked under the inbox lock: a roster installed after this check prunes the
            // waiter inserted below (see `set_roster`).
            if let Some(e) = self.stale_wait(peer, epoch) {
                return Err(e);
            }
            let (tx, rx) = oneshot::channel();
            inbox.waiting.insert(key.clone(), (tx, epoch));
            rx
        };
        let bound = self.inner.cfg.start_timeout;
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(x)) => Ok(x),
            // `set_roster` dropped the sender: the peer left the view, or the view was
            // replaced.
            Ok(Err(_)) => Err(self
                .stale_wait(peer, epoch)
                .unwrap_or_else(|| DataPlaneError::Left(peer.clone()))),
            Err(_) => {
                self.inner.inbox.lock().unwrap().waiting.remove(&key);
                Err(DataPlaneError::Timeout {
                    peer: peer.clone(),
                    what: "start the collective",
                    after: bound,
                })
            }
        }
    }
}
