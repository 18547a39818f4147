//! Per-packet records of one RTP stream, by sequence number, in a ring that grows with the
//! stream's packet rate: it starts small and doubles, up to a most, each time its owner
//! finds a lap of it quicker than it must reach back. The NACK responder's history
//! ([`crate::responder`]) and the send times of the NACK age limit ([`crate::nack_age`])
//! are such rings: a subscriber of a light stream keeps room for a light stream.

/// A record a ring holds.
pub(crate) trait Numbered: Clone + Default {
    /// The sequence number it is for; `None` for an empty slot.
    fn seq(&self) -> Option<u16>;
}

/// Records by sequence number modulo the ring's length, a power of two, so the slots stay
/// in step across the sequence numbers' wrap (and a slot is found by a mask, not a
/// division, on the per-packet path).
pub(crate) struct SeqRing<T> {
    slots: Vec<T>,
    most: usize,
}

impl<T: Numbered> SeqRing<T> {
    /// Room for `first` records, growing up to `most` (each rounded up to a power of two).
    pub(crate) fn new(first: usize, most: usize) -> SeqRing<T> {
        let first = first.max(1).next_power_of_two();
        SeqRing { slots: vec![T::default(); first], most: most.max(first).next_power_of_two() }
    }

    /// How many records it has room for now.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The slot of `seq`.
    pub(crate) fn index(&self, seq: u16) -> usize {
        usize::from(seq) & (self.slots.len() - 1)
    }

    /// The slot of `seq` (which may hold another sequence number's record).
    pub(crate) fn get(&self, seq: u16) -> Option<&T> {
        self.slots.get(self.index(seq))
    }

    /// The slot of `seq`, to write.
    pub(crate) fn get_mut(&mut self, seq: u16) -> Option<&mut T> {
        let at = self.index(seq);
        self.slots.get_mut(at)
    }

    /// Doubles the ring unless it is at its most; whether it grew. What it holds must lie
    /// within one lap, as it does when the owner grows it at the start of a lap: each
    /// record then has a slot of its own in the ring twice the size.
    pub(crate) fn grow(&mut self) -> bool {
        if self.slots.len() >= self.most {
            return false;
        }
        let len = self.slots.len() * 2;
        let mut slots = vec![T::default(); len];
        for record in self.slots.drain(..) {
            if let Some(slot) = record.seq().and_then(|seq| slots.get_mut(usize::from(seq) & (len - 1))) {
                *slot = record;
            }
        }
        self.slots = slots;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Numbered for Option<u16> {
        fn seq(&self) -> Option<u16> {
            *self
        }
    }

    #[test]
    fn records_keep_their_sequence_numbers_as_the_ring_doubles_across_the_wrap() {
        let mut ring: SeqRing<Option<u16>> = SeqRing::new(48, 200);
        assert_eq!(ring.len(), 64, "rounded up to a power of two");
        // One lap that straddles the wrap.
        let lap: Vec<u16> = (0..64u16).map(|i| 65_500u16.wrapping_add(i)).collect();
        for &seq in &lap {
            *ring.get_mut(seq).unwrap() = Some(seq);
        }
        for (len, grew) in [(128, true), (256, true), (256, false)] {
            assert_eq!(ring.grow(), grew);
            assert_eq!(ring.len(), len);
            for &seq in &lap {
                assert_eq!(ring.get(seq), Some(&Some(seq)), "{seq} at length {len}");
            }
        }
        // Empty slots stay empty; a sequence number a lap away shares a slot.
        assert_eq!(ring.get(100), Some(&None));
        assert_eq!(ring.index(65_500), ring.index(65_500u16.wrapping_add(256)));
    }
}
