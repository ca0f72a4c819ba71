//! A range allocator: the "globally locked allocator" of the research.
//!
//! Free space is an ordered map of `start -> len` (Linux uses a red-black
//! tree of allocated ranges; an ordered map of free ranges is the same idea).
//! Allocation is first fit at the requested alignment; freeing coalesces with
//! both neighbours. iommud uses it for IOVAs (sizes are powers of two of
//! pages, naturally aligned, the size classes of the magazines) and, on the
//! `sim` platform, for physical frames. The caller provides the lock.

use std::collections::BTreeMap;

/// Free-range allocator over `[base, base+len)`.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    free: BTreeMap<u64, u64>,
    base: u64,
    end: u64,
    allocated: u64,
}

impl RangeAllocator {
    /// An allocator with the whole range free.
    pub fn new(base: u64, len: u64) -> RangeAllocator {
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(base, len);
        }
        RangeAllocator {
            free,
            base,
            end: base.saturating_add(len),
            allocated: 0,
        }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let (start, flen, at) = self.free.iter().find_map(|(&s, &l)| {
            let at = s.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(len)? <= s + l).then_some((s, l, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let tail = start + flen - (at + len);
        if tail > 0 {
            self.free.insert(at + len, tail);
        }
        self.allocated += len;
        Some(at)
    }

    /// Frees a range from [`RangeAllocator::alloc`]. Returns false (and
    /// changes nothing) if any part of it is already free or out of range:
    /// a double free is a caller bug that must not corrupt the allocator.
    pub fn free(&mut self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if len == 0 || start < self.base || end > self.end {
            return false;
        }
        let prev = self.free.range(..=start).next_back().map(|(&s, &l)| (s, l));
        let next = self.free.range(start..).next().map(|(&s, &l)| (s, l));
        if prev.is_some_and(|(s, l)| s + l > start) || next.is_some_and(|(s, _)| s < end) {
            return false;
        }
        let (mut s, mut e) = (start, end);
        if let Some((ps, pl)) = prev.filter(|(ps, pl)| ps + pl == start) {
            self.free.remove(&ps);
            s = ps;
            let _ = pl;
        }
        if let Some((ns, nl)) = next.filter(|(ns, _)| *ns == end) {
            self.free.remove(&ns);
            e = ns + nl;
        }
        self.free.insert(s, e - s);
        self.allocated -= len;
        true
    }

    /// Allocates exactly `[start, start+len)` (a range a previous owner
    /// allocated, taken back); false (and nothing changed) unless all of it
    /// is free.
    pub fn reserve(&mut self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let Some((s, l)) = self.free.range(..=start).next_back().map(|(&s, &l)| (s, l)) else {
            return false;
        };
        if len == 0 || s + l < end {
            return false;
        }
        self.free.remove(&s);
        if start > s {
            self.free.insert(s, start - s);
        }
        if s + l > end {
            self.free.insert(end, s + l - end);
        }
        self.allocated += len;
        true
    }

    /// Bytes currently allocated.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Number of free fragments (a measure of fragmentation).
    pub fn fragments(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_takes_exactly_a_free_range() {
        let mut a = RangeAllocator::new(0x1000, 0x10000);
        assert!(a.reserve(0x3000, 0x2000));
        assert!(!a.reserve(0x4000, 0x1000), "overlaps the reserved range");
        assert!(!a.reserve(0x10000, 0x2000), "runs past the end");
        assert_eq!(a.allocated(), 0x2000);
        // The rest is free on both sides of it, and freeing it joins them again.
        assert!(a.reserve(0x1000, 0x2000));
        assert!(a.reserve(0x5000, 0xc000));
        assert_eq!(a.alloc(0x1000, 0x1000), None);
        assert!(a.free(0x3000, 0x2000));
        assert_eq!(a.alloc(0x2000, 0x1000), Some(0x3000));
    }
    use proptest::prelude::*;

    #[test]
    fn aligned_first_fit_and_coalescing() {
        let mut a = RangeAllocator::new(0x1000, 0x10000);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x1000));
        // 0x2000 is the next 8 KiB-aligned start.
        assert_eq!(a.alloc(0x2000, 0x2000), Some(0x2000));
        assert_eq!(a.alloc(0x4000, 0x4000), Some(0x4000));
        assert_eq!(a.allocated(), 0x7000);
        assert!(a.free(0x2000, 0x2000));
        assert!(!a.free(0x2000, 0x2000), "double free refused");
        assert!(!a.free(0x2800, 0x1000), "overlapping free refused");
        assert!(a.free(0x1000, 0x1000));
        assert!(a.free(0x4000, 0x4000));
        assert_eq!(a.fragments(), 1);
        assert_eq!(a.allocated(), 0);
        assert_eq!(a.alloc(0x10000, 0x1000), Some(0x1000));
        assert_eq!(a.alloc(0x1000, 0x1000), None);
    }

    proptest! {
        #[test]
        fn ranges_never_overlap_and_all_space_returns(ops in proptest::collection::vec((0u32..6, any::<bool>(), any::<usize>()), 1..400)) {
            let mut a = RangeAllocator::new(0x10_0000, 0x40_0000);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (class, is_alloc, pick) in ops {
                if is_alloc || live.is_empty() {
                    let len = 0x1000u64 << class;
                    if let Some(at) = a.alloc(len, len) {
                        prop_assert_eq!(at % len, 0);
                        for &(s, l) in &live {
                            prop_assert!(at + len <= s || s + l <= at, "overlap");
                        }
                        live.push((at, len));
                    }
                } else {
                    let (s, l) = live.swap_remove(pick % live.len());
                    prop_assert!(a.free(s, l));
                }
            }
            for (s, l) in live { prop_assert!(a.free(s, l)); }
            prop_assert_eq!(a.allocated(), 0);
            prop_assert_eq!(a.fragments(), 1);
        }
    }
}
