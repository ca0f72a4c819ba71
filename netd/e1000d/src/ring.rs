//! Ring index arithmetic shared by the TX and RX rings (pure functions).
//!
//! Convention (8254x SDM 3.2.6 and 3.3.4): the device owns the descriptors from head
//! up to, not including, tail. Software keeps one slot unused so that `head == tail`
//! always means "nothing owned by the device", never "everything".

/// The slot after `i` in a ring of `n` slots.
pub fn next(i: u16, n: u16) -> u16 {
    debug_assert!(n > 0 && i < n);
    if i + 1 == n {
        0
    } else {
        i + 1
    }
}

/// Slots in flight from `from` (inclusive) up to `to` (exclusive), with wrap.
pub fn distance(from: u16, to: u16, n: u16) -> u16 {
    debug_assert!(from < n && to < n);
    if to >= from {
        to - from
    } else {
        n - from + to
    }
}

/// No slot in flight between the software clean index and the tail.
pub fn is_empty(clean: u16, tail: u16) -> bool {
    clean == tail
}

/// Posting one more descriptor at `tail` would make tail catch up with `clean`.
pub fn is_full(clean: u16, tail: u16, n: u16) -> bool {
    next(tail, n) == clean
}

/// Slots software may still post (one is always kept unused).
pub fn free_slots(clean: u16, tail: u16, n: u16) -> u16 {
    n - 1 - distance(clean, tail, n)
}

/// A ring length is valid for the device: the byte length must be a multiple of 128
/// (8254x SDM 13.4.29 RDLEN / 13.4.38 TDLEN), i.e. a multiple of 8 descriptors, and
/// the index registers are 16 bits wide.
pub fn valid_len(n: usize) -> bool {
    n >= 8 && n.is_multiple_of(8) && n <= 65536 / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_wraps() {
        assert_eq!(next(0, 8), 1);
        assert_eq!(next(6, 8), 7);
        assert_eq!(next(7, 8), 0);
    }

    #[test]
    fn distance_with_and_without_wrap() {
        assert_eq!(distance(2, 5, 8), 3);
        assert_eq!(distance(5, 5, 8), 0);
        assert_eq!(distance(6, 1, 8), 3); // 6, 7, 0
        assert_eq!(distance(7, 6, 8), 7);
    }

    #[test]
    fn empty_and_full() {
        assert!(is_empty(3, 3));
        assert!(!is_full(3, 3, 8));
        assert_eq!(free_slots(3, 3, 8), 7);
        // 7 posted starting at 3: tail = 2; one more would hit clean.
        assert!(is_full(3, 2, 8));
        assert_eq!(free_slots(3, 2, 8), 0);
        assert!(is_full(0, 7, 8));
        assert!(!is_full(0, 6, 8));
    }

    #[test]
    fn post_and_reap_sequence_keeps_invariants() {
        let n = 8;
        let (mut clean, mut tail) = (0u16, 0u16);
        let mut in_flight = 0u16;
        for step in 0..1000u32 {
            if step % 3 != 2 && !is_full(clean, tail, n) {
                tail = next(tail, n);
                in_flight += 1;
            } else if !is_empty(clean, tail) {
                clean = next(clean, n);
                in_flight -= 1;
            }
            assert_eq!(distance(clean, tail, n), in_flight);
            assert_eq!(free_slots(clean, tail, n), n - 1 - in_flight);
        }
    }

    #[test]
    fn valid_lengths() {
        assert!(valid_len(8));
        assert!(valid_len(256));
        assert!(!valid_len(4));
        assert!(!valid_len(100));
    }
}
