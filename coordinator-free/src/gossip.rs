//! Gossip acceptance: what a node makes of a message that arrived on the control topic.
//!
//! Gossipsub runs with strict signing and application-level validation: every message
//! names its signed author, and the node tells gossipsub whether to forward it (accept),
//! drop it quietly (ignore) or drop it and penalise the peer that relayed it (reject).
//! [`admit`] decides that, for every kind of [`ControlMessage`], and says what the message
//! means for this node ([`Admission`]); the shell maps [`Admission::acceptance`] to
//! libp2p's `MessageAcceptance`, counts [`Admission::tally`], and carries out the action
//! (dial a member, keep an NCCL id, start a job, pass a model announcement on).
//!
//! The rules:
//! - bytes that do not decode (size limits, validation: [`ControlMessage::decode`]) are
//!   rejected;
//! - a heartbeat or a model announcement speaks for its signed author only: one that names
//!   another peer is a forgery and rejected; a heartbeat of its author goes to the
//!   [`Membership`], which takes it (accept), finds it older than one it has (a replay or
//!   a reordering: ignored, but counted as rejected) or refuses it otherwise (ignore);
//! - an NCCL id is for one view: for another view it is ignored, and for the current view
//!   it is taken only from the view's root ([`crate::collective::nccl_root`]), rejected
//!   from anyone else;
//! - a job announcement of a job this node already runs is forwarded (others may have
//!   missed it) and counted as ignored; a new one is started if the shell can read its job
//!   file ([`Jobs::parse`]), rejected otherwise.

use crate::codec::{CodecError, ControlMessage, ServeAnnounce};
use crate::membership::{HeartbeatError, Membership};
use crate::view::{NodeId, ViewHash};

/// What gossipsub should do with a message (libp2p's `MessageAcceptance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// Valid: forward it to other peers.
    Accept,
    /// Not forwarded, no penalty (stale, or of no use here).
    Ignore,
    /// Not forwarded, and the peer that relayed it is penalised (malformed or forged).
    Reject,
}

/// Which of the node's gossip counters a message counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// Taken and acted on.
    Accepted,
    /// Stale or a duplicate.
    Ignored,
    /// Malformed, forged or replayed.
    Rejected,
}

/// The shell's training jobs, as far as accepting a job announcement needs them. The job
/// file is the shell's format: it parses it.
pub trait Jobs {
    /// A parsed job file.
    type Spec;
    /// Whether this node already runs (or ran) the run `run`.
    fn knows(&self, run: u64) -> bool;
    /// Parses and validates a job file; the error says why it is not one.
    fn parse(&self, spec: &str) -> Result<Self::Spec, String>;
}

/// A message that speaks for someone other than its signed author.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forgery {
    /// A heartbeat naming another member.
    Heartbeat {
        /// The member it claims to come from.
        claimed: NodeId,
    },
    /// A model announcement naming another origin.
    Serve {
        /// The origin it claims.
        claimed: NodeId,
    },
    /// An NCCL id for the current view not minted by the view's root (or unsigned).
    NcclId,
}

/// What a gossiped message means for this node, and so what to do with it.
#[derive(Debug)]
pub enum Admission<S> {
    /// A member's heartbeat, now in the membership table. Dial the member at `addrs` if
    /// not connected.
    Heartbeat {
        /// The member.
        id: NodeId,
        /// Its control-plane addresses.
        addrs: Vec<String>,
    },
    /// The NCCL id of the current view, from its root: keep it.
    NcclId {
        /// The current view's hash.
        view_hash: ViewHash,
        /// The id.
        id: Vec<u8>,
    },
    /// A model announcement of its author: hand it to the server.
    Serve(ServeAnnounce),
    /// A job this node does not run yet: start it.
    NewJob {
        /// The run id.
        run: u64,
        /// Continue from the checkpoint.
        resume: bool,
        /// The parsed job file.
        spec: S,
    },
    /// A re-announcement of a job this node already runs: nothing to do.
    KnownJob {
        /// The run id.
        run: u64,
    },
    /// An NCCL id for a view other than the current one: nothing to do.
    OtherView,
    /// A heartbeat of its author older than one already taken (a replay or a reordering;
    /// gossip drops exact duplicates itself).
    Replayed {
        /// The member.
        id: NodeId,
        /// [`HeartbeatError::StaleSeq`] or [`HeartbeatError::StaleIncarnation`].
        error: HeartbeatError,
    },
    /// A heartbeat of its author the membership did not take for another reason (our own
    /// id, a full table, a broken content rule).
    NotTaken {
        /// The member.
        id: NodeId,
        /// Why.
        error: HeartbeatError,
    },
    /// Bytes that are not a valid control message.
    Malformed(CodecError),
    /// A job announcement whose job file does not parse.
    InvalidJob(String),
    /// A message speaking for someone other than its author.
    Forged(Forgery),
}

impl<S> Admission<S> {
    /// Whether gossipsub forwards the message.
    pub fn acceptance(&self) -> Acceptance {
        match self {
            Admission::Heartbeat { .. }
            | Admission::NcclId { .. }
            | Admission::Serve(_)
            | Admission::NewJob { .. }
            | Admission::KnownJob { .. } => Acceptance::Accept,
            Admission::OtherView | Admission::Replayed { .. } | Admission::NotTaken { .. } => {
                Acceptance::Ignore
            }
            Admission::Malformed(_) | Admission::InvalidJob(_) | Admission::Forged(_) => {
                Acceptance::Reject
            }
        }
    }

    /// The counter the message counts in. A known job is forwarded but counted as ignored;
    /// a replayed heartbeat is ignored (no penalty: reordering happens) but counted as
    /// rejected.
    pub fn tally(&self) -> Tally {
        match self {
            Admission::Heartbeat { .. }
            | Admission::NcclId { .. }
            | Admission::Serve(_)
            | Admission::NewJob { .. } => Tally::Accepted,
            Admission::KnownJob { .. } | Admission::OtherView | Admission::NotTaken { .. } => {
                Tally::Ignored
            }
            Admission::Replayed { .. }
            | Admission::Malformed(_)
            | Admission::InvalidJob(_)
            | Admission::Forged(_) => Tally::Rejected,
        }
    }
}

/// Decides on the gossip payload `bytes` signed by `author` (`None`: unsigned, or not a
/// valid node id) that arrived at `now`. A heartbeat of its author is handed to
/// `membership` (which is the only state this changes); everything else is left to the
/// caller, as the returned [`Admission`] says.
pub fn admit<J: Jobs>(
    bytes: &[u8],
    author: Option<&NodeId>,
    membership: &mut Membership,
    jobs: &J,
    now: u64,
) -> Admission<J::Spec> {
    match ControlMessage::decode(bytes) {
        Ok(msg) => admit_message(msg, author, membership, jobs, now),
        Err(e) => Admission::Malformed(e),
    }
}

/// [`admit`] for a message already decoded (and validated) by [`ControlMessage::decode`].
pub fn admit_message<J: Jobs>(
    msg: ControlMessage,
    author: Option<&NodeId>,
    membership: &mut Membership,
    jobs: &J,
    now: u64,
) -> Admission<J::Spec> {
    match msg {
        ControlMessage::Heartbeat(hb) => {
            if author != Some(&hb.id) {
                return Admission::Forged(Forgery::Heartbeat { claimed: hb.id });
            }
            let id = hb.id.clone();
            let addrs = hb.addrs.clone();
            match membership.handle_heartbeat(hb, now) {
                Ok(()) => Admission::Heartbeat { id, addrs },
                Err(
                    error @ (HeartbeatError::StaleSeq { .. }
                    | HeartbeatError::StaleIncarnation { .. }),
                ) => Admission::Replayed { id, error },
                Err(error) => Admission::NotTaken { id, error },
            }
        }
        ControlMessage::NcclId { view_hash, id } => {
            let view = membership.view();
            if view_hash != view.hash {
                Admission::OtherView
            } else if author.is_none() || author != crate::collective::nccl_root(view) {
                Admission::Forged(Forgery::NcclId)
            } else {
                Admission::NcclId { view_hash, id }
            }
        }
        ControlMessage::Job { run, resume, spec } => {
            if jobs.knows(run) {
                return Admission::KnownJob { run };
            }
            match jobs.parse(&spec) {
                Ok(spec) => Admission::NewJob { run, resume, spec },
                Err(e) => Admission::InvalidJob(e),
            }
        }
        ControlMessage::Serve(a) => {
            if author != Some(&a.origin) {
                Admission::Forged(Forgery::Serve { claimed: a.origin })
            } else {
                Admission::Serve(a)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::NCCL_ID_LEN;
    use crate::membership::{Capabilities, Heartbeat, MembershipConfig};

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn node(name: &str) -> Membership {
        Membership::new(
            id(name),
            1,
            Capabilities::default(),
            vec![],
            MembershipConfig::default(),
            0,
        )
    }

    fn beat(m: &mut Membership, now: u64) -> Heartbeat {
        m.handle_timeout(now, 0);
        m.poll_transmit().expect("heartbeat due")
    }

    /// Runs 7 and 8 are known; a job file parses when it starts with `name`.
    struct TestJobs;

    impl Jobs for TestJobs {
        type Spec = String;
        fn knows(&self, run: u64) -> bool {
            run == 7 || run == 8
        }
        fn parse(&self, spec: &str) -> Result<String, String> {
            if spec.starts_with("name") {
                Ok(spec.to_uppercase())
            } else {
                Err(format!("not a job file: {spec}"))
            }
        }
    }

    fn admit_msg(
        msg: &ControlMessage,
        author: Option<&str>,
        m: &mut Membership,
        now: u64,
    ) -> Admission<String> {
        let author = author.map(id);
        admit(&msg.encode().unwrap(), author.as_ref(), m, &TestJobs, now)
    }

    fn verdict<S>(a: &Admission<S>) -> (Acceptance, Tally) {
        (a.acceptance(), a.tally())
    }

    #[test]
    fn heartbeats_speak_for_their_author_and_replays_are_ignored() {
        let mut a = node("a");
        let mut b = node("b");
        let hb = ControlMessage::Heartbeat(Heartbeat {
            addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            ..beat(&mut b, 0)
        });
        // Relayed by anyone, signed by someone else: a forgery, and not taken.
        let forged = admit_msg(&hb, Some("c"), &mut a, 1);
        assert_eq!(verdict(&forged), (Acceptance::Reject, Tally::Rejected));
        assert!(matches!(
            forged,
            Admission::Forged(Forgery::Heartbeat { ref claimed }) if claimed == &id("b")
        ));
        assert!(matches!(
            admit_msg(&hb, None, &mut a, 1),
            Admission::Forged(_)
        ));
        assert_eq!(a.view().len(), 1, "a forged heartbeat changes nothing");
        // Signed by its author: taken into the membership.
        let taken = admit_msg(&hb, Some("b"), &mut a, 2);
        assert_eq!(verdict(&taken), (Acceptance::Accept, Tally::Accepted));
        match taken {
            Admission::Heartbeat { id: who, addrs } => {
                assert_eq!(who, id("b"));
                assert_eq!(addrs, vec!["/ip4/10.0.0.2/tcp/4001".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.view().len(), 2);
        // The same heartbeat again: a replay, ignored without penalty but counted.
        let replay = admit_msg(&hb, Some("b"), &mut a, 3);
        assert_eq!(verdict(&replay), (Acceptance::Ignore, Tally::Rejected));
        assert!(matches!(
            replay,
            Admission::Replayed {
                error: HeartbeatError::StaleSeq { got: 1, known: 1 },
                ..
            }
        ));
        // Our own id, signed by "us" (another process with our key): not taken, ignored.
        let mut a2 = node("a");
        let own = ControlMessage::Heartbeat(beat(&mut a2, 4));
        let not_taken = admit_msg(&own, Some("a"), &mut a, 4);
        assert_eq!(verdict(&not_taken), (Acceptance::Ignore, Tally::Ignored));
        assert!(matches!(
            not_taken,
            Admission::NotTaken {
                error: HeartbeatError::OwnId,
                ..
            }
        ));
    }

    #[test]
    fn nccl_ids_come_from_the_views_root_for_the_current_view() {
        // View {a, b}: a is the root (smallest id).
        let mut b = node("b");
        let mut a = node("a");
        b.handle_heartbeat(beat(&mut a, 0), 0).unwrap();
        let view = b.view().hash;
        let msg = |view_hash| ControlMessage::NcclId {
            view_hash,
            id: vec![3; NCCL_ID_LEN],
        };
        let taken = admit_msg(&msg(view), Some("a"), &mut b, 1);
        assert_eq!(verdict(&taken), (Acceptance::Accept, Tally::Accepted));
        assert!(
            matches!(taken, Admission::NcclId { view_hash, ref id } if view_hash == view && id == &vec![3; NCCL_ID_LEN])
        );
        for author in [Some("b"), Some("c"), None] {
            let forged = admit_msg(&msg(view), author, &mut b, 1);
            assert_eq!(verdict(&forged), (Acceptance::Reject, Tally::Rejected));
            assert!(matches!(forged, Admission::Forged(Forgery::NcclId)));
        }
        // Another view: ignored whoever sent it.
        let other = crate::view::ViewHash([9; 32]);
        for author in [Some("a"), Some("c"), None] {
            let stale = admit_msg(&msg(other), author, &mut b, 1);
            assert_eq!(verdict(&stale), (Acceptance::Ignore, Tally::Ignored));
            assert!(matches!(stale, Admission::OtherView));
        }
    }

    #[test]
    fn job_announcements_start_new_jobs_once() {
        let mut m = node("a");
        let job = |run, spec: &str| ControlMessage::Job {
            run,
            resume: true,
            spec: spec.into(),
        };
        let new = admit_msg(&job(1, "name = 'x'"), Some("b"), &mut m, 0);
        assert_eq!(verdict(&new), (Acceptance::Accept, Tally::Accepted));
        assert!(matches!(
            new,
            Admission::NewJob { run: 1, resume: true, ref spec } if spec == "NAME = 'X'"
        ));
        // A job already known is forwarded, whatever its file says.
        let known = admit_msg(&job(7, "garbage"), Some("b"), &mut m, 0);
        assert_eq!(verdict(&known), (Acceptance::Accept, Tally::Ignored));
        assert!(matches!(known, Admission::KnownJob { run: 7 }));
        let invalid = admit_msg(&job(2, "garbage"), Some("b"), &mut m, 0);
        assert_eq!(verdict(&invalid), (Acceptance::Reject, Tally::Rejected));
        assert!(matches!(invalid, Admission::InvalidJob(ref e) if e.contains("garbage")));
    }

    #[test]
    fn model_announcements_speak_for_their_origin() {
        let mut m = node("a");
        let announce = ControlMessage::Serve(ServeAnnounce {
            name: "tiny".into(),
            sha256: [1; 32],
            bytes: 1000,
            origin: id("b"),
            config: "{}".into(),
            stages: 1,
            speed: 0,
        });
        let taken = admit_msg(&announce, Some("b"), &mut m, 0);
        assert_eq!(verdict(&taken), (Acceptance::Accept, Tally::Accepted));
        assert!(matches!(taken, Admission::Serve(ref a) if a.name == "tiny"));
        for author in [Some("c"), None] {
            let forged = admit_msg(&announce, author, &mut m, 0);
            assert_eq!(verdict(&forged), (Acceptance::Reject, Tally::Rejected));
            assert!(matches!(
                forged,
                Admission::Forged(Forgery::Serve { ref claimed }) if claimed == &id("b")
            ));
        }
    }

    #[test]
    fn malformed_bytes_are_rejected() {
        let mut m = node("a");
        for bytes in [&b""[..], &[0xff; 40][..], &[0u8, 0xff, 0xff][..]] {
            let a = admit(bytes, Some(&id("b")), &mut m, &TestJobs, 0);
            assert_eq!(verdict(&a), (Acceptance::Reject, Tally::Rejected));
            assert!(matches!(a, Admission::Malformed(_)));
        }
        // A message over the size limit is refused before it is parsed.
        let big = vec![0u8; crate::codec::MAX_CONTROL_MESSAGE + 1];
        assert!(matches!(
            admit(&big, None, &mut m, &TestJobs, 0),
            Admission::Malformed(CodecError::TooLarge { .. })
        ));
        assert_eq!(m.view().len(), 1);
    }
}
