//! Blobs in pieces, so that a node fetches one blob from several members at once and
//! serves what it has while it still receives the rest: the cluster's uplinks share the
//! fan-out instead of one holder's carrying N − 1 copies.
//!
//! A piece is at least 256 KiB, and a power of two large enough that a blob has at most
//! 1,024 of them. A receiver serves a piece only once it has all of it, so the piece
//! size is the delay each hop of the fan-out adds: 256 KiB is 50 ms at 40 Mbit/s, while
//! a request's round trip stays small beside it and a few in flight keep a link full.
//! Layers of a few MiB split into pieces many members can serve at once; the cap keeps a
//! blob's hash list at 32 KiB and its availability bitmap at 128 bytes whatever its size.

use std::hash::Hasher;

/// The least piece size.
pub const MIN_PIECE: u64 = 256 << 10;
/// The most pieces a blob has.
pub const MAX_PIECES: u64 = 1024;

/// A piece's SHA-256.
pub type PieceHash = [u8; 32];

/// How a blob of a given length is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub len: u64,
    pub piece: u64,
}

impl Geometry {
    pub fn of(len: u64) -> Geometry {
        let piece = len
            .div_ceil(MAX_PIECES)
            .checked_next_power_of_two()
            .unwrap_or(1 << 63)
            .max(MIN_PIECE);
        Geometry { len, piece }
    }

    pub fn count(&self) -> u32 {
        // At most MAX_PIECES by construction.
        u32::try_from(self.len.div_ceil(self.piece)).unwrap_or(u32::MAX)
    }

    /// The offset and length of piece `index`.
    pub fn span(&self, index: u32) -> (u64, u64) {
        let start = u64::from(index) * self.piece;
        (start, self.piece.min(self.len.saturating_sub(start)))
    }

    /// The piece that holds byte `offset`.
    pub fn piece_at(&self, offset: u64) -> u32 {
        u32::try_from(offset / self.piece).unwrap_or(u32::MAX)
    }
}

/// Which pieces of a blob are present, as a bitmap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PieceSet {
    bits: Vec<u8>,
    count: u32,
    present: u32,
}

impl PieceSet {
    pub fn new(count: u32) -> PieceSet {
        PieceSet {
            bits: vec![0; count.div_ceil(8) as usize],
            count,
            present: 0,
        }
    }

    pub fn full(count: u32) -> PieceSet {
        let mut set = PieceSet::new(count);
        for index in 0..count {
            set.insert(index);
        }
        set
    }

    /// The bitmap as the transfer protocol carries it; `None` if it is not one of
    /// `count` pieces (a wrong length, or a bit past the end).
    pub fn from_bytes(bytes: &[u8], count: u32) -> Option<PieceSet> {
        if bytes.len() != count.div_ceil(8) as usize {
            return None;
        }
        let mut set = PieceSet::new(count);
        for index in 0..bytes.len() as u32 * 8 {
            if bytes[(index / 8) as usize] & (1 << (index % 8)) != 0 {
                if index >= count {
                    return None;
                }
                set.insert(index);
            }
        }
        Some(set)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn present(&self) -> u32 {
        self.present
    }

    pub fn is_full(&self) -> bool {
        self.present == self.count
    }

    pub fn contains(&self, index: u32) -> bool {
        index < self.count && self.bits[(index / 8) as usize] & (1 << (index % 8)) != 0
    }

    pub fn insert(&mut self, index: u32) {
        if index < self.count && !self.contains(index) {
            self.bits[(index / 8) as usize] |= 1 << (index % 8);
            self.present += 1;
        }
    }

    pub fn remove(&mut self, index: u32) {
        if self.contains(index) {
            self.bits[(index / 8) as usize] &= !(1 << (index % 8));
            self.present -= 1;
        }
    }

    /// The first piece not present (`count` when all are).
    pub fn first_missing(&self) -> u32 {
        (0..self.count)
            .find(|&i| !self.contains(i))
            .unwrap_or(self.count)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.count).filter(|&i| self.contains(i))
    }
}

/// What the picker knows when it chooses a piece for one peer.
pub struct Picker<'a> {
    /// Pieces this node has.
    pub have: &'a PieceSet,
    /// Pieces asked for and not answered yet.
    pub asked: &'a PieceSet,
    /// Pieces whose hash is known (only those can be checked on arrival).
    pub hashed: &'a PieceSet,
    /// How many known peers have each piece.
    pub availability: &'a [u16],
    /// How far past the first missing piece to look: the bytes a reader waits for in
    /// order come first, and within the window the rarest.
    pub window: u32,
    /// Past the window too, once nothing in it is left to ask.
    pub beyond: bool,
    /// Breaks ties differently on every node, so that nodes that start together ask
    /// for different pieces and soon have something to give each other.
    pub salt: u64,
}

impl Picker<'_> {
    /// The piece to ask a peer that has `theirs` for: missing here, not asked for yet,
    /// checkable, within the window; the rarest, ties broken by the salt.
    pub fn pick(&self, theirs: &PieceSet) -> Option<u32> {
        let first = self.have.first_missing();
        let end = first.saturating_add(self.window).min(self.have.count());
        let wanted = |i: &u32| {
            !self.have.contains(*i)
                && !self.asked.contains(*i)
                && self.hashed.contains(*i)
                && theirs.contains(*i)
        };
        let rarest = |range: std::ops::Range<u32>| {
            range.filter(wanted).min_by_key(|&i| {
                let rarity = self.availability.get(i as usize).copied().unwrap_or(0);
                (rarity, tie_break(self.salt, i))
            })
        };
        rarest(first..end).or_else(|| {
            if self.beyond {
                rarest(end..self.have.count())
            } else {
                None
            }
        })
    }
}

fn tie_break(salt: u64, index: u32) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write_u64(salt);
    hasher.write_u32(index);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_has_at_most_1024_pieces_of_at_least_1_mib() {
        let small = Geometry::of(10);
        assert_eq!((small.piece, small.count()), (MIN_PIECE, 1));
        assert_eq!(small.span(0), (0, 10));
        assert_eq!(Geometry::of(0).count(), 0);
        const P: u64 = MIN_PIECE;
        let exact = Geometry::of(3 * P);
        assert_eq!(exact.count(), 3);
        assert_eq!(exact.span(2), (2 * P, P));
        let odd = Geometry::of(5 * P + 7);
        assert_eq!(odd.count(), 6);
        assert_eq!(odd.span(5), (5 * P, 7));
        assert_eq!(odd.piece_at(5 * P + 3), 5);
        // Past 1,024 pieces of the least size, pieces grow by powers of two.
        let large = Geometry::of(5 * P * MAX_PIECES);
        assert_eq!(large.piece, 8 * P);
        assert_eq!(large.count(), 640);
        for len in [1u64, MIN_PIECE * MAX_PIECES + 1, 64 << 30, u64::MAX / 2] {
            let g = Geometry::of(len);
            assert!(u64::from(g.count()) <= MAX_PIECES, "{len}");
            assert!(g.piece.is_power_of_two());
            let (start, last) = g.span(g.count() - 1);
            assert_eq!(start + last, len);
        }
    }

    #[test]
    fn a_bitmap_round_trips_and_rejects_what_is_not_one() {
        let mut set = PieceSet::new(11);
        for i in [0, 3, 10] {
            set.insert(i);
        }
        set.insert(3);
        set.insert(11);
        assert_eq!(set.present(), 3);
        assert_eq!(set.first_missing(), 1);
        let back = PieceSet::from_bytes(set.as_bytes(), 11).unwrap();
        assert_eq!(back, set);
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![0, 3, 10]);
        assert!(
            PieceSet::from_bytes(&[0, 0, 0], 11).is_none(),
            "wrong length"
        );
        assert!(
            PieceSet::from_bytes(&[0, 0x08], 11).is_none(),
            "bit 11 of 11"
        );
        set.remove(0);
        assert_eq!((set.present(), set.first_missing()), (2, 0));
        assert!(PieceSet::full(9).is_full());
    }

    fn picker<'a>(
        have: &'a PieceSet,
        asked: &'a PieceSet,
        hashed: &'a PieceSet,
        availability: &'a [u16],
        salt: u64,
    ) -> Picker<'a> {
        Picker {
            have,
            asked,
            hashed,
            availability,
            window: 4,
            beyond: false,
            salt,
        }
    }

    #[test]
    fn the_picker_takes_the_rarest_checkable_piece_in_the_window_then_past_it() {
        let count = 8;
        let mut have = PieceSet::new(count);
        have.insert(0);
        let asked = PieceSet::new(count);
        let hashed = PieceSet::full(count);
        let theirs = PieceSet::full(count);
        // Window 1..5; piece 3 is the rarest.
        let availability = [5, 3, 3, 1, 3, 0, 0, 0];
        let w = picker(&have, &asked, &hashed, &availability, 7);
        assert_eq!(w.pick(&theirs), Some(3));
        // Pieces past the window wait, however rare, unless the picker looks beyond;
        // then the rarest there.
        let mut asked = PieceSet::new(count);
        for i in 1..5 {
            asked.insert(i);
        }
        let mut w = picker(&have, &asked, &hashed, &availability, 7);
        assert_eq!(w.pick(&theirs), None);
        let availability = [5, 3, 3, 1, 3, 2, 1, 2];
        w.availability = &availability;
        w.beyond = true;
        assert_eq!(w.pick(&theirs), Some(6));
        let mut fewer = asked.clone();
        fewer.remove(2);
        let w = Picker { asked: &fewer, ..w };
        assert_eq!(w.pick(&theirs), Some(2), "the window first, however common");
        // Not what they lack, nor what cannot be checked.
        let asked = PieceSet::new(count);
        let mut theirs = PieceSet::new(count);
        theirs.insert(2);
        theirs.insert(3);
        let mut hashed = PieceSet::full(count);
        hashed.remove(3);
        let w = picker(&have, &asked, &hashed, &availability, 7);
        assert_eq!(w.pick(&theirs), Some(2));
        have.insert(2);
        let w = picker(&have, &asked, &hashed, &availability, 7);
        assert_eq!(w.pick(&theirs), None);
    }

    #[test]
    fn nodes_that_start_together_ask_for_different_pieces() {
        let count = 16;
        let have = PieceSet::new(count);
        let asked = PieceSet::new(count);
        let hashed = PieceSet::full(count);
        let theirs = PieceSet::full(count);
        let availability = [1u16; 16];
        let firsts: std::collections::HashSet<u32> = (0..8)
            .filter_map(|salt| {
                let mut w = picker(&have, &asked, &hashed, &availability, salt);
                w.window = 16;
                w.pick(&theirs)
            })
            .collect();
        assert!(firsts.len() >= 4, "eight nodes' first picks: {firsts:?}");
    }
}
