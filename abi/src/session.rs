//! The Redox carrier's side of the contract: where a driver opens its
//! session, how a reply's shared regions are laid out in the session
//! handle's mmap offsets, and how a frame's length is read from its header
//! (the server and the client of `/scheme/iommu` both use these).

use crate::proto::HEADER_LEN;

/// Distance between two regions in a Redox session's mmap offset space:
/// larger than any region iommud hands out.
pub const REGION_SPAN: u64 = 1 << 40;

/// The path of the Redox session for PCI function `bdf` (bus << 8 | dev << 3 | fn).
pub fn session_path(bdf: u16) -> String {
    format!("/scheme/iommu/domains/{}/session", crate::Bdf(bdf))
}

/// The mmap offset of region `slot` of a Redox session.
pub fn slot_offset(slot: u64) -> u64 {
    slot.saturating_mul(REGION_SPAN)
}

/// Length of the frame at the start of `buf`, from its header's payload
/// length (bytes 56..60), if all of it is inside `buf`.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let len_bytes: [u8; 4] = buf.get(56..60)?.try_into().ok()?;
    let total = HEADER_LEN.checked_add(u32::from_le_bytes(len_bytes) as usize)?;
    (total <= buf.len()).then_some(total)
}

/// Bookkeeping of a Redox session's region slots: each reply's offered
/// regions take the next slots.
#[derive(Debug, Default)]
pub struct Slots {
    next: u64,
}

impl Slots {
    /// Takes `offered` slots; returns the first.
    pub fn take(&mut self, offered: usize) -> u64 {
        let first = self.next;
        self.next += offered as u64;
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Reply, Request};

    #[test]
    fn session_paths_name_the_function() {
        assert_eq!(session_path(0x18), "/scheme/iommu/domains/00:03.0/session");
        assert_eq!(
            session_path(0x0a_1f),
            "/scheme/iommu/domains/0a:03.7/session"
        );
    }

    #[test]
    fn slots_are_consecutive_and_spaced_by_the_span() {
        let mut s = Slots::default();
        assert_eq!(s.take(2), 0);
        assert_eq!(s.take(0), 2);
        assert_eq!(s.take(1), 2);
        assert_eq!(s.take(1), 3);
        assert_eq!(slot_offset(3), 3 << 40);
        assert_eq!(slot_offset(u64::MAX), u64::MAX);
    }

    #[test]
    fn frame_len_reads_the_header() {
        let f = Request::ReadPath {
            path: "stats".into(),
        }
        .encode(7);
        let mut buf = f.clone();
        buf.extend_from_slice(&[0xee; 100]);
        assert_eq!(frame_len(&buf), Some(f.len()));
        assert_eq!(frame_len(&f[..f.len() - 1]), None);
        assert_eq!(frame_len(&f[..10]), None);
        let _ = Reply::decode(&buf[..f.len()]);
    }
}
