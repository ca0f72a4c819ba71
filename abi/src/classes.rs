//! Sizes both sides agree on: the page, IOVA size classes and magazines, the
//! deferred flush queue's bounds.

/// Bytes of a page (VT-d second-level tables map 4 KiB pages).
pub const PAGE: u64 = 4096;
/// IOVAs per magazine (Linux uses 127 or 128: one 1 KiB slab of pointers).
pub const MAG_SIZE: usize = 128;
/// Size classes: 1, 2, 4, 8, 16, 32 pages (Linux: `IOVA_RANGE_CACHE_MAX_SIZE` 6).
pub const SIZE_CLASSES: usize = 6;
/// Unmaps the deferred policy's domain-wide queue holds before it asks for a
/// flush (Linux's flush queue: 256 entries or 10 ms).
pub const FLUSH_QUEUE_LEN: usize = 256;
/// ... or this long (ns) after its oldest entry.
pub const FLUSH_QUEUE_TIMEOUT_NS: u64 = 10_000_000;

/// Size class of an allocation of `pages` pages, if cached (≤ 32 pages).
pub fn size_class(pages: u64) -> Option<usize> {
    if pages == 0 || pages > 32 {
        return None;
    }
    Some(pages.next_power_of_two().trailing_zeros() as usize)
}

/// Where a remap may keep its old IOVA (docs/ARCHITECTURE.md, "Kept
/// remaps"): the old mapping at `old` (`old_len` bytes) and the new buffer
/// (`len` bytes at `phys`) have the same in-page offset and the same number
/// of pages, within a size class. Returns the old mapping's page-aligned
/// IOVA and its pages; the caller still checks that each leaf entry there
/// is exactly the one the new map would write. Both sides (iommud's rings,
/// libdma's delegated fast path) decide with this.
pub fn keep_span(old: u64, old_len: u64, phys: u64, len: u64) -> Option<(u64, u64)> {
    let off = phys % PAGE;
    if old % PAGE != off || old_len == 0 || len == 0 {
        return None;
    }
    let pages = off.checked_add(len)?.div_ceil(PAGE);
    if off.checked_add(old_len)?.div_ceil(PAGE) != pages {
        return None;
    }
    size_class(pages)?;
    Some((old - off, pages))
}

/// Pages in size class `class`.
pub fn class_pages(class: usize) -> u64 {
    1 << class
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        let want = [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (17, 5), (32, 5)];
        for (pages, class) in want {
            assert_eq!(size_class(pages), Some(class), "{pages} pages");
            assert!(class_pages(class) >= pages);
        }
        assert_eq!(size_class(0), None);
        assert_eq!(size_class(33), None);
        assert_eq!(class_pages(SIZE_CLASSES - 1), 32);
    }

    #[test]
    fn a_kept_remap_needs_the_same_offset_and_pages() {
        // 2 KiB at offset 0x800 of a page, mapped at IOVA 0x4000_1800.
        assert_eq!(
            keep_span(0x4000_1800, 2048, 0x9000_0800, 2048),
            Some((0x4000_1000, 1))
        );
        // A shorter frame in the same page keeps; one spilling into the next does not.
        assert_eq!(
            keep_span(0x4000_1800, 2048, 0x9000_0800, 60),
            Some((0x4000_1000, 1))
        );
        assert_eq!(keep_span(0x4000_1800, 2048, 0x9000_0800, 2049), None);
        // Another in-page offset, zero lengths, beyond the largest class, overflow.
        assert_eq!(keep_span(0x4000_1000, 2048, 0x9000_0800, 2048), None);
        assert_eq!(keep_span(0x4000_1800, 0, 0x9000_0800, 2048), None);
        assert_eq!(keep_span(0x4000_1800, 2048, 0x9000_0800, 0), None);
        assert_eq!(
            keep_span(0x4000_0000, 33 * PAGE, 0x9000_0000, 33 * PAGE),
            None
        );
        assert_eq!(keep_span(0x4000_0800, u64::MAX, 0x9000_0800, 2048), None);
        // 3 pages: class 2 (4 pages), kept whole.
        assert_eq!(
            keep_span(0x4001_0000, 3 * PAGE, 0x9001_0000, 3 * PAGE),
            Some((0x4001_0000, 3))
        );
    }
}
