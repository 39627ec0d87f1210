//! Views: the agreed-upon answer to "who is in".
//!
//! A view is `(epoch, members sorted by id, hash)`. Each member is named by its id and its
//! incarnation, so a node that restarted under the same id makes a *different* view. The
//! hash covers the epoch and every member; two nodes hold the same view exactly when their
//! hashes are equal, and every collective or pipeline hop carries it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Longest accepted node id, in bytes (libp2p peer ids in base58 are 52 or 53 characters).
pub const MAX_NODE_ID_LEN: usize = 128;

/// The id of a node: in the shell, its libp2p peer id in base58. Ordered bytewise; the
/// sorted order of a view's ids is the ring order every deterministic rule uses.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// Why a string is not a valid [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    /// The id is empty.
    #[error("node id is empty")]
    Empty,
    /// The id is longer than [`MAX_NODE_ID_LEN`] bytes.
    #[error("node id is {0} bytes, more than the limit of {MAX_NODE_ID_LEN}")]
    TooLong(usize),
    /// The id contains a byte outside printable ASCII.
    #[error("node id contains a byte outside printable ASCII")]
    NotPrintable,
}

impl NodeId {
    /// Checks and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, NodeIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(NodeIdError::TooLong(id.len()));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(NodeIdError::NotPrintable);
        }
        Ok(NodeId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short form for tables and logs: the last 8 characters (peer ids share a prefix).
    pub fn short(&self) -> &str {
        let n = self.0.len();
        &self.0[n.saturating_sub(8)..]
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// One member of a view: an id at one incarnation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ViewMember {
    /// The member's id.
    pub id: NodeId,
    /// How many times the member has started under this id (bumped on every restart).
    pub incarnation: u64,
}

/// SHA-256 over a view's epoch and members.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ViewHash(pub [u8; 32]);

impl ViewHash {
    /// The full hash in lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 bytes in hex, for tables and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for ViewHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for ViewHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ViewHash({})", self.short())
    }
}

/// A view: epoch, members sorted by id, and the hash of both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Monotonic per node; nodes holding the same members converge on the largest epoch
    /// any of them reached (see [`crate::membership`]).
    pub epoch: u64,
    /// Sorted by id, no duplicates.
    pub members: Vec<ViewMember>,
    /// [`View::hash_of`] of the two fields above.
    pub hash: ViewHash,
}

impl View {
    /// Builds a view; sorts and deduplicates members by id (keeping the highest incarnation).
    pub fn new(epoch: u64, mut members: Vec<ViewMember>) -> View {
        members.sort();
        // After sorting, equal ids are adjacent with ascending incarnation: keep the last.
        let mut dedup: Vec<ViewMember> = Vec::with_capacity(members.len());
        for m in members {
            match dedup.last_mut() {
                Some(last) if last.id == m.id => *last = m,
                _ => dedup.push(m),
            }
        }
        let hash = View::hash_of(epoch, &dedup);
        View {
            epoch,
            members: dedup,
            hash,
        }
    }

    /// The hash of `epoch` and `members` (which must already be sorted by id).
    pub fn hash_of(epoch: u64, members: &[ViewMember]) -> ViewHash {
        let mut h = Sha256::new();
        h.update(b"shoal/view/v1");
        h.update(epoch.to_le_bytes());
        h.update((members.len() as u64).to_le_bytes());
        for m in members {
            h.update((m.id.as_str().len() as u32).to_le_bytes());
            h.update(m.id.as_str().as_bytes());
            h.update(m.incarnation.to_le_bytes());
        }
        ViewHash(h.finalize().into())
    }

    /// Whether `id` is a member (any incarnation).
    pub fn contains(&self, id: &NodeId) -> bool {
        self.position(id).is_some()
    }

    /// The rank of `id` in ring order (sorted ids), if it is a member.
    pub fn position(&self, id: &NodeId) -> Option<usize> {
        self.members.binary_search_by(|m| m.id.cmp(id)).ok()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the view has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members' ids in ring order.
    pub fn ids(&self) -> impl Iterator<Item = &NodeId> {
        self.members.iter().map(|m| &m.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, inc: u64) -> ViewMember {
        ViewMember {
            id: NodeId::new(id).unwrap(),
            incarnation: inc,
        }
    }

    #[test]
    fn node_id_validation() {
        assert_eq!(NodeId::new(""), Err(NodeIdError::Empty));
        assert_eq!(NodeId::new("a b"), Err(NodeIdError::NotPrintable));
        assert_eq!(NodeId::new("x".repeat(129)), Err(NodeIdError::TooLong(129)));
        assert_eq!(NodeId::new("12D3KooWabc").unwrap().short(), "3KooWabc");
    }

    #[test]
    fn view_sorts_dedups_and_hash_depends_on_everything() {
        let v = View::new(3, vec![m("b", 1), m("a", 2), m("b", 4)]);
        assert_eq!(v.members, vec![m("a", 2), m("b", 4)]);
        assert_eq!(v.position(&NodeId::new("b").unwrap()), Some(1));
        let same = View::new(3, vec![m("a", 2), m("b", 4)]);
        assert_eq!(v.hash, same.hash);
        assert_ne!(v.hash, View::new(4, vec![m("a", 2), m("b", 4)]).hash);
        assert_ne!(v.hash, View::new(3, vec![m("a", 2), m("b", 5)]).hash);
        assert_ne!(v.hash, View::new(3, vec![m("a", 2)]).hash);
        // Length-prefixing keeps ("ab","c") distinct from ("a","bc").
        assert_ne!(
            View::new(1, vec![m("ab", 1), m("c", 1)]).hash,
            View::new(1, vec![m("a", 1), m("bc", 1)]).hash
        );
    }
}
