//! Splitting a step's batch among the members of a view: rendezvous hashing over a grid
//! of shards with bounded loads ([`assign`]).

use super::order::mix64;
use super::{ShardingError, StepBatch};
use crate::view::NodeId;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::ops::Range;

/// Domain tag mixed into every rendezvous score.
const SCORE_DOMAIN: u64 = 0x7368_6f61_6c2f_7363; // "shoal/sc"
/// Domain tag hashed before a member id to form its digest.
const MEMBER_DOMAIN: &[u8] = b"shoal/shard/member/v1";

/// A member's 64-bit digest for rendezvous scores: the first 8 bytes (little-endian) of
/// SHA-256 over a domain tag, the id's length (u32, little-endian) and the id's bytes.
pub fn member_digest(id: &NodeId) -> u64 {
    let mut h = Sha256::new();
    h.update(MEMBER_DOMAIN);
    h.update((id.as_str().len() as u32).to_le_bytes());
    h.update(id.as_str().as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_le_bytes(first)
}

/// The rendezvous score of a member (by its [`member_digest`]) for shard `shard` of data
/// epoch `epoch`: `mix64(mix64(mix64(epoch ^ SCORE_DOMAIN) + shard) ^ digest)`. Higher wins.
pub fn rendezvous_score(epoch: u64, shard: u64, digest: u64) -> u64 {
    let key = mix64(mix64(epoch ^ SCORE_DOMAIN).wrapping_add(shard));
    mix64(key ^ digest)
}

/// One member's part of an [`Assignment`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct Share {
    id: NodeId,
    weight: u32,
    ranges: Vec<Range<u64>>,
    samples: u64,
}

/// How one [`StepBatch`] is split among members: for each member, the position ranges it
/// owns (one per piece, ascending, each inside one shard) and its sample count. Built by
/// [`assign`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    batch: StepBatch,
    shard_size: u64,
    /// In the order the members were given.
    shares: Vec<Share>,
    /// Every piece in position order, with the index of its owner in `shares`.
    pieces: Vec<(Range<u64>, usize)>,
}

impl Assignment {
    fn share(&self, member: &NodeId) -> Option<&Share> {
        self.shares.iter().find(|s| &s.id == member)
    }

    /// The position ranges `member` owns, ascending; each lies inside one shard (so its
    /// shard index is `range.start / shard_size`). Empty if the member owns nothing or was
    /// not given to [`assign`].
    pub fn ranges(&self, member: &NodeId) -> &[Range<u64>] {
        self.share(member).map_or(&[], |s| s.ranges.as_slice())
    }

    /// How many samples `member` processes this step (0 if none or unknown).
    pub fn samples(&self, member: &NodeId) -> u64 {
        self.share(member).map_or(0, |s| s.samples)
    }

    /// Every member given to [`assign`], in the given order, with its sample count (0 for
    /// members that got nothing, such as weight-0 members).
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, u64)> {
        self.shares.iter().map(|s| (&s.id, s.samples))
    }

    /// Every piece of the batch in position order, with its owner. The pieces tile the
    /// batch exactly.
    pub fn pieces(&self) -> impl Iterator<Item = (Range<u64>, &NodeId)> {
        self.pieces
            .iter()
            .map(|(r, i)| (r.clone(), &self.shares[*i].id))
    }

    /// Who owns `position`, if the batch covers it.
    pub fn owner_of(&self, position: u64) -> Option<&NodeId> {
        let i = self.pieces.partition_point(|(r, _)| r.end <= position);
        self.pieces
            .get(i)
            .filter(|(r, _)| r.contains(&position))
            .map(|(_, owner)| &self.shares[*owner].id)
    }

    /// The positions `member` owns, ascending (index the epoch order with them to get
    /// sample ids).
    pub fn positions<'a>(&'a self, member: &NodeId) -> impl Iterator<Item = u64> + 'a {
        self.ranges(member).iter().flat_map(|r| r.clone())
    }

    /// The batch this assignment splits.
    pub fn batch(&self) -> &StepBatch {
        &self.batch
    }

    /// The shard size the batch was cut with.
    pub fn shard_size(&self) -> u64 {
        self.shard_size
    }

    /// `member`'s weight-proportional share of the batch, `len * weight / total weight`,
    /// rounded down (0 if unknown). [`assign`] keeps every member strictly within one
    /// `shard_size` of the exact (unrounded) share.
    pub fn fair_share(&self, member: &NodeId) -> u64 {
        let total: u128 = self.shares.iter().map(|s| u128::from(s.weight)).sum();
        match self.share(member) {
            Some(s) if total > 0 => {
                (u128::from(self.batch.len) * u128::from(s.weight) / total) as u64
            }
            _ => 0,
        }
    }
}

/// A member taking part in [`assign`]'s greedy (weight > 0).
struct Candidate {
    /// Index in `shares`.
    share: usize,
    digest: u64,
    weight: u128,
    /// Samples assigned so far.
    load: u64,
}

/// Splits `batch` among `members` (`(id, weight)`; weight 0 means "give it nothing").
///
/// The batch's positions are cut along the shard grid (shard `s` is positions
/// `[s * shard_size, (s + 1) * shard_size)` of the epoch order) into *pieces*: the
/// intersections of the batch with each shard it touches, in position order. Every member
/// has a target share `len * weight / total_weight` (an exact fraction). Each piece, in
/// order, goes to:
///
/// - among the members with *room* for the whole piece (load + piece size <= target), the
///   one with the highest [`rendezvous_score`] for `(epoch, shard index, member)`;
/// - if no member has room, the member with the most room left (target - load), ties
///   broken by the higher score.
///
/// Remaining ties (equal 64-bit scores) go to the smaller id.
///
/// Guarantees:
/// - every position of the batch is owned by exactly one member;
/// - weight-0 members own nothing, and adding or removing them changes nothing;
/// - the result does not depend on the order of `members`;
/// - every member's sample count is *strictly within `shard_size`* of its exact target,
///   for any batch, aligned or not. Over: a member is handed a piece it has no room for
///   only when nobody has room, and then it has the most room, which is positive (the
///   rooms add up to the samples not yet handed out), so it ends less than a piece over.
///   Under: a member ending `shard_size` or more under its target had room for every
///   piece, so nobody was ever handed a piece without room and nobody ended over its
///   target; as the counts add up to the batch, nobody ended under it either.
/// - when every piece is a whole shard (a shard-aligned batch), this is bounded-load
///   rendezvous with capacities in pieces by largest remainder: each member takes, by
///   score, up to `floor(pieces * weight / total_weight)` pieces, and the leftover pieces
///   go one each to the largest remainders (ties to the higher score). Capacities counted
///   in pieces would break the one-shard bound on unaligned batches (pieces of 1, 10, 10
///   and 1 samples over three equal members: the member allowed two pieces could take both
///   whole shards, 20 samples against a target of 7.3), hence targets in samples.
/// - a piece goes to its highest-scoring member whenever that member has room for it.
///
/// Not guaranteed: that a member joining or leaving moves only its own pieces. With tight
/// loads survivors trade some pieces too, even survivors whose share ends unchanged: one
/// that takes over a piece of the leaver (because it scores higher for it) can then run out
/// of room for a later piece it used to own, which goes to someone else. With 4 equal
/// members and batches of 64 whole shards, a departure hands the leaver's 25% of the batch
/// to the survivors and moves about 4% more between survivors (test
/// `a_leaver_moves_few_pieces_between_survivors`); a join is the same change backwards.
///
/// Errors, checked in this order: [`ShardingError::ZeroBatchSize`] (`batch.len == 0`),
/// [`ShardingError::ZeroShardSize`], [`ShardingError::BatchOverflow`],
/// [`ShardingError::DuplicateMember`], [`ShardingError::NoPositiveWeight`].
///
/// Cost: O(pieces × members); pieces = at most `len / shard_size + 2`. Arithmetic is exact in
/// `u128` for fewer than 2^31 members.
pub fn assign(
    members: &[(NodeId, u32)],
    batch: &StepBatch,
    shard_size: u64,
) -> Result<Assignment, ShardingError> {
    if batch.len == 0 {
        return Err(ShardingError::ZeroBatchSize);
    }
    if shard_size == 0 {
        return Err(ShardingError::ZeroShardSize);
    }
    let start = batch.cursor.offset;
    let end = start
        .checked_add(batch.len)
        .ok_or(ShardingError::BatchOverflow {
            offset: start,
            len: batch.len,
        })?;
    let mut seen = BTreeSet::new();
    for (id, _) in members {
        if !seen.insert(id) {
            return Err(ShardingError::DuplicateMember(id.clone()));
        }
    }
    let total: u128 = members.iter().map(|(_, w)| u128::from(*w)).sum();
    if total == 0 {
        return Err(ShardingError::NoPositiveWeight);
    }

    let mut shares: Vec<Share> = members
        .iter()
        .map(|(id, w)| Share {
            id: id.clone(),
            weight: *w,
            ranges: Vec::new(),
            samples: 0,
        })
        .collect();
    let mut candidates: Vec<Candidate> = members
        .iter()
        .enumerate()
        .filter(|(_, (_, w))| *w > 0)
        .map(|(i, (id, w))| Candidate {
            share: i,
            digest: member_digest(id),
            weight: u128::from(*w),
            load: 0,
        })
        .collect();

    let len = u128::from(batch.len);
    // room(c) * total = len * weight - load * total; both terms are at most len * total.
    let fits = |c: &Candidate, size: u64| {
        (u128::from(c.load) + u128::from(size)) * total <= len * c.weight
    };
    // Whether a has strictly more room than b.
    let more_room = |a: &Candidate, b: &Candidate| {
        len * a.weight + u128::from(b.load) * total > len * b.weight + u128::from(a.load) * total
    };

    // Each candidate's rank in id order, to break equal scores.
    let mut by_id: Vec<usize> = (0..candidates.len()).collect();
    by_id.sort_by(|&a, &b| {
        shares[candidates[a].share]
            .id
            .cmp(&shares[candidates[b].share].id)
    });
    let mut id_rank = vec![0; candidates.len()];
    for (rank, &c) in by_id.iter().enumerate() {
        id_rank[c] = rank;
    }

    let mut pieces = Vec::new();
    let mut scores = vec![0u64; candidates.len()];
    let mut pos = start;
    while pos < end {
        let shard = pos / shard_size;
        let piece_end = shard
            .saturating_mul(shard_size)
            .saturating_add(shard_size)
            .min(end);
        let size = piece_end - pos;
        for (score, c) in scores.iter_mut().zip(&candidates) {
            *score = rendezvous_score(batch.cursor.epoch, shard, c.digest);
        }
        // Whether candidate a beats candidate b here: higher score, then smaller id.
        let beats = |a: usize, b: usize| {
            scores[a] > scores[b] || (scores[a] == scores[b] && id_rank[a] < id_rank[b])
        };
        let mut best: Option<usize> = None;
        for (i, c) in candidates.iter().enumerate() {
            if fits(c, size) && best.is_none_or(|b| beats(i, b)) {
                best = Some(i);
            }
        }
        let winner = best.unwrap_or_else(|| {
            // Nobody has room: the most room left, then the higher score.
            let mut w = 0;
            for i in 1..candidates.len() {
                let (a, b) = (&candidates[i], &candidates[w]);
                if more_room(a, b) || (!more_room(b, a) && beats(i, w)) {
                    w = i;
                }
            }
            w
        });
        let c = &mut candidates[winner];
        c.load += size;
        let share = &mut shares[c.share];
        share.ranges.push(pos..piece_end);
        share.samples += size;
        pieces.push((pos..piece_end, c.share));
        pos = piece_end;
    }

    Ok(Assignment {
        batch: *batch,
        shard_size,
        shares,
        pieces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharding::DataCursor;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn batch(epoch: u64, offset: u64, len: u64) -> StepBatch {
        StepBatch {
            cursor: DataCursor { epoch, offset },
            len,
        }
    }

    /// |samples - len * w / W| < shard_size, in exact integers.
    fn within_one_shard(a: &Assignment, members: &[(NodeId, u32)]) {
        let total: u128 = members.iter().map(|(_, w)| u128::from(*w)).sum();
        let len = u128::from(a.batch().len);
        for (m, w) in members {
            let got = u128::from(a.samples(m)) * total;
            let want = len * u128::from(*w);
            let diff = got.abs_diff(want);
            assert!(
                diff < u128::from(a.shard_size()) * total,
                "{m} got {} of {len}, weight {w}/{total}, shard {}",
                a.samples(m),
                a.shard_size()
            );
        }
    }

    /// Every position of the batch is owned exactly once, by `pieces`, `ranges` and
    /// `owner_of` alike.
    fn tiles(a: &Assignment) {
        let b = a.batch().positions();
        let mut next = b.start;
        for (r, owner) in a.pieces() {
            assert_eq!(r.start, next);
            assert!(r.end > r.start);
            assert_eq!(r.start / a.shard_size(), (r.end - 1) / a.shard_size());
            assert!(a.ranges(owner).contains(&r));
            assert_eq!(a.owner_of(r.start), Some(owner));
            assert_eq!(a.owner_of(r.end - 1), Some(owner));
            next = r.end;
        }
        assert_eq!(next, b.end);
        assert_eq!(a.owner_of(b.end), None);
        let sum: u64 = a.members().map(|(_, n)| n).sum();
        assert_eq!(sum, a.batch().len);
        let mut all: Vec<u64> = a
            .members()
            .flat_map(|(m, _)| a.positions(m).collect::<Vec<_>>())
            .collect();
        all.sort();
        assert_eq!(all, b.collect::<Vec<_>>());
    }

    #[test]
    fn assign_rejects_bad_input() {
        let ms = vec![(id("a"), 1), (id("b"), 1)];
        let b = batch(0, 0, 10);
        assert_eq!(
            assign(&ms, &batch(0, 0, 0), 4),
            Err(ShardingError::ZeroBatchSize)
        );
        assert_eq!(assign(&ms, &b, 0), Err(ShardingError::ZeroShardSize));
        assert_eq!(
            assign(&ms, &batch(0, u64::MAX, 2), 4),
            Err(ShardingError::BatchOverflow {
                offset: u64::MAX,
                len: 2
            })
        );
        let dup = vec![(id("a"), 1), (id("b"), 0), (id("a"), 2)];
        assert_eq!(
            assign(&dup, &b, 4),
            Err(ShardingError::DuplicateMember(id("a")))
        );
        assert_eq!(assign(&[], &b, 4), Err(ShardingError::NoPositiveWeight));
        assert_eq!(
            assign(&[(id("a"), 0), (id("b"), 0)], &b, 4),
            Err(ShardingError::NoPositiveWeight)
        );
    }

    #[test]
    fn assign_tiles_the_batch_and_balances() {
        let ms: Vec<(NodeId, u32)> = vec![
            (id("a"), 1),
            (id("b"), 2),
            (id("c"), 0),
            (id("d"), 5),
            (id("e"), 1),
        ];
        for shard in [1u64, 3, 7, 16, 64, 1000] {
            for (offset, len) in [(0, 64), (5, 64), (13, 1), (13, 200), (0, 999), (997, 3)] {
                for epoch in 0..3 {
                    let a = assign(&ms, &batch(epoch, offset, len), shard).unwrap();
                    tiles(&a);
                    within_one_shard(&a, &ms);
                    assert_eq!(a.samples(&id("c")), 0);
                    assert!(a.ranges(&id("c")).is_empty());
                    assert!(a.ranges(&id("zz")).is_empty());
                    assert_eq!(a.samples(&id("zz")), 0);
                    let order: Vec<&NodeId> = a.members().map(|(m, _)| m).collect();
                    assert_eq!(order, ms.iter().map(|(m, _)| m).collect::<Vec<_>>());
                }
            }
        }
    }

    #[test]
    fn aligned_batches_get_largest_remainder_piece_counts() {
        // 10 whole shards over weights 1:1:1 -> quotas 3.33 each: counts {4, 3, 3}.
        let ms = vec![(id("a"), 1), (id("b"), 1), (id("c"), 1)];
        let a = assign(&ms, &batch(0, 40, 40), 4).unwrap();
        let mut counts: Vec<usize> = ms.iter().map(|(m, _)| a.ranges(m).len()).collect();
        counts.sort();
        assert_eq!(counts, vec![3, 3, 4]);
        // Weights 1:2:7 over 10 pieces: exactly proportional.
        let ms = vec![(id("a"), 1), (id("b"), 2), (id("c"), 7)];
        let a = assign(&ms, &batch(2, 0, 100), 10).unwrap();
        assert_eq!(
            ms.iter().map(|(m, _)| a.samples(m)).collect::<Vec<_>>(),
            vec![10, 20, 70]
        );
    }

    #[test]
    fn partial_pieces_stay_within_one_shard() {
        // The case piece capacities by count get wrong: pieces of 1, 10, 10, 1 samples over
        // three equal members. Counts {2, 1, 1} could give one member both whole shards
        // (20 samples against a share of 7.33); sample targets cannot.
        let ms = vec![(id("a"), 1), (id("b"), 1), (id("c"), 1)];
        for epoch in 0..50 {
            let a = assign(&ms, &batch(epoch, 9, 22), 10).unwrap();
            assert_eq!(a.pieces().count(), 4);
            tiles(&a);
            within_one_shard(&a, &ms);
        }
    }

    #[test]
    fn result_does_not_depend_on_member_order() {
        let ms = vec![(id("a"), 3), (id("b"), 1), (id("c"), 2), (id("d"), 2)];
        let mut rev = ms.clone();
        rev.reverse();
        for epoch in 0..20 {
            let b = batch(epoch, 3, 50);
            let x = assign(&ms, &b, 4).unwrap();
            let y = assign(&rev, &b, 4).unwrap();
            for (m, _) in &ms {
                assert_eq!(x.ranges(m), y.ranges(m));
            }
        }
    }

    #[test]
    fn a_single_member_takes_everything() {
        let ms = vec![(id("solo"), 3)];
        let a = assign(&ms, &batch(0, 5, 17), 4).unwrap();
        assert_eq!(a.samples(&id("solo")), 17);
        assert_eq!(
            a.ranges(&id("solo")),
            &[5..8, 8..12, 12..16, 16..20, 20..22]
        );
        assert_eq!(a.fair_share(&id("solo")), 17);
    }
}
