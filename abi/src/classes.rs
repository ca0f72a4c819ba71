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
}
