//! Command and completion encodings: the 64-byte submission queue entry, the 16-byte
//! completion queue entry, and PRP (Physical Region Page) data pointers.
//!
//! Sections cite the NVM Express Base Specification 1.4 (admin commands, entry formats)
//! and its NVM command set (§6, READ/WRITE/FLUSH).

/// Bytes per submission queue entry (CC.IOSQES = 6, §4.2).
pub const SQE_LEN: usize = 64;
/// Bytes per completion queue entry (CC.IOCQES = 4, §4.6).
pub const CQE_LEN: usize = 16;
/// Memory page size used (CC.MPS = 0: 4 KiB).
pub const PAGE: u64 = 4096;
/// PRP entries in one list page (§4.3: 8 bytes each).
pub const PRPS_PER_PAGE: usize = (PAGE / 8) as usize;

/// Admin command opcodes (§5, Figure 139).
pub mod admin {
    /// Create I/O Submission Queue (§5.4).
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue (§5.6).
    pub const DELETE_CQ: u8 = 0x04;
    /// Delete I/O Submission Queue (§5.7).
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Completion Queue (§5.3).
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify (§5.15).
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features (§5.21).
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes (§6, Figure 346).
pub mod nvm {
    /// Flush (§6.8).
    pub const FLUSH: u8 = 0x00;
    /// Write (§6.15).
    pub const WRITE: u8 = 0x01;
    /// Read (§6.9).
    pub const READ: u8 = 0x02;
}

/// Identify CNS values (§5.15.1, Figure 244).
pub mod cns {
    /// Identify Namespace data structure for NSID.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u32 = 0x01;
}

/// Feature identifier Number of Queues (§5.21.1.7).
pub const FID_NUM_QUEUES: u32 = 0x07;

/// A submission queue entry as its sixteen little-endian dwords (§4.2, Figure 105).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sqe(pub [u32; 16]);

impl Sqe {
    /// CDW0: opcode (7:0), FUSE (9:8) = 0, PSDT (15:14) = 0 (PRPs), CID (31:16); NSID in
    /// CDW1.
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut d = [0u32; 16];
        d[0] = u32::from(opcode) | u32::from(cid) << 16;
        d[1] = nsid;
        Sqe(d)
    }

    /// Data pointer: PRP1 in CDW6-7, PRP2 in CDW8-9 (§4.2).
    pub fn prps(mut self, prp1: u64, prp2: u64) -> Sqe {
        self.0[6] = prp1 as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = prp2 as u32;
        self.0[9] = (prp2 >> 32) as u32;
        self
    }

    /// Sets command dword `n` (10..=15).
    pub fn cdw(mut self, n: usize, v: u32) -> Sqe {
        if (10..16).contains(&n) {
            self.0[n] = v;
        }
        self
    }

    /// The command identifier.
    pub fn cid(&self) -> u16 {
        (self.0[0] >> 16) as u16
    }

    /// Identify (§5.15): CNS in CDW10 bits 7:0; the 4 KiB result goes to PRP1.
    pub fn identify(cid: u16, nsid: u32, cns: u32, prp1: u64) -> Sqe {
        Sqe::new(admin::IDENTIFY, cid, nsid)
            .prps(prp1, 0)
            .cdw(10, cns & 0xff)
    }

    /// Set Features Number of Queues (§5.21.1.7): CDW11 = NCQR (31:16) | NSQR (15:0),
    /// both 0's based.
    pub fn set_num_queues(cid: u16, n: u16) -> Sqe {
        let z = u32::from(n.saturating_sub(1));
        Sqe::new(admin::SET_FEATURES, cid, 0)
            .cdw(10, FID_NUM_QUEUES)
            .cdw(11, z << 16 | z)
    }

    /// Create I/O Completion Queue (§5.3): CDW10 = QSIZE (31:16, 0's based) | QID;
    /// CDW11 = IV (31:16) = 0, IEN (bit 1) = 0 (polled), PC (bit 0) = 1.
    pub fn create_cq(cid: u16, qid: u16, entries: u16, base: u64) -> Sqe {
        Sqe::new(admin::CREATE_CQ, cid, 0)
            .prps(base, 0)
            .cdw(
                10,
                u32::from(entries.saturating_sub(1)) << 16 | u32::from(qid),
            )
            .cdw(11, 1)
    }

    /// Create I/O Submission Queue (§5.4): CDW10 as for a CQ; CDW11 = CQID (31:16) |
    /// QPRIO (2:1) = 0 | PC (bit 0) = 1.
    pub fn create_sq(cid: u16, qid: u16, entries: u16, cqid: u16, base: u64) -> Sqe {
        Sqe::new(admin::CREATE_SQ, cid, 0)
            .prps(base, 0)
            .cdw(
                10,
                u32::from(entries.saturating_sub(1)) << 16 | u32::from(qid),
            )
            .cdw(11, u32::from(cqid) << 16 | 1)
    }

    /// Delete I/O Submission Queue (§5.7) or Completion Queue (§5.6): QID in CDW10.
    pub fn delete_queue(cid: u16, opcode: u8, qid: u16) -> Sqe {
        Sqe::new(opcode, cid, 0).cdw(10, u32::from(qid))
    }

    /// READ or WRITE (§6.9, §6.15): SLBA in CDW10 (low) and CDW11 (high), NLB (0's
    /// based) in CDW12 bits 15:0.
    pub fn rw(opcode: u8, cid: u16, nsid: u32, slba: u64, nlb: u16, prp: &Prp) -> Sqe {
        Sqe::new(opcode, cid, nsid)
            .prps(prp.prp1, prp.prp2)
            .cdw(10, slba as u32)
            .cdw(11, (slba >> 32) as u32)
            .cdw(12, u32::from(nlb.saturating_sub(1)))
    }

    /// FLUSH (§6.8): no data.
    pub fn flush(cid: u16, nsid: u32) -> Sqe {
        Sqe::new(nvm::FLUSH, cid, nsid)
    }
}

/// A completion queue entry (§4.6, Figure 121).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// DW0: command specific.
    pub result: u32,
    /// DW2 bits 15:0: SQ head pointer.
    pub sq_head: u16,
    /// DW2 bits 31:16: SQ identifier.
    pub sq_id: u16,
    /// DW3 bits 15:0.
    pub cid: u16,
    /// DW3 bit 16: phase tag.
    pub phase: bool,
    /// DW3 bits 31:17: the status field (§4.6.1).
    pub status: u16,
}

impl Cqe {
    /// Decodes the four dwords of an entry.
    pub fn decode(d: [u32; 4]) -> Cqe {
        Cqe {
            result: d[0],
            sq_head: d[2] as u16,
            sq_id: (d[2] >> 16) as u16,
            cid: d[3] as u16,
            phase: d[3] & (1 << 16) != 0,
            status: (d[3] >> 17) as u16,
        }
    }

    /// Status Code (status bits 7:0, §4.6.1.2).
    pub fn sc(&self) -> u8 {
        self.status as u8
    }

    /// Status Code Type (status bits 10:8): 0 generic, 1 command specific, 2 media.
    pub fn sct(&self) -> u8 {
        ((self.status >> 8) & 7) as u8
    }

    /// Do Not Retry (status bit 14).
    pub fn dnr(&self) -> bool {
        self.status & (1 << 14) != 0
    }

    /// SCT 0, SC 0: successful completion.
    pub fn ok(&self) -> bool {
        self.sc() == 0 && self.sct() == 0
    }
}

/// Names a status for messages (generic command status, §4.6.1.2.1).
pub fn status_name(sct: u8, sc: u8) -> &'static str {
    match (sct, sc) {
        (0, 0x00) => "successful completion",
        (0, 0x01) => "invalid command opcode",
        (0, 0x02) => "invalid field in command",
        (0, 0x04) => "data transfer error",
        (0, 0x06) => "internal error",
        (0, 0x07) => "command abort requested",
        (0, 0x0b) => "invalid namespace or format",
        (0, 0x13) => "PRP offset invalid",
        (0, 0x80) => "LBA out of range",
        (1, 0x01) => "invalid queue identifier",
        (1, 0x02) => "invalid queue size",
        (2, _) => "media or data integrity error",
        _ => "other",
    }
}

/// A command's data pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prp {
    /// PRP1.
    pub prp1: u64,
    /// PRP2: 0, the second page, or the IOVA of a PRP list.
    pub prp2: u64,
}

/// What PRP2 must hold for a transfer (§4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prp2 {
    /// The transfer fits the page of PRP1.
    None,
    /// It ends in the next page: PRP2 is that page's address.
    Page(u64),
    /// It spans three pages or more: PRP2 points at a list of these page addresses.
    List(Vec<u64>),
}

/// PRP1 and what PRP2 needs for `len` bytes at IOVA-contiguous `iova` (§4.3: PRP1 may
/// carry an offset, dword aligned; every later entry is page aligned). `None` for an
/// empty or misaligned transfer, or one whose list would need more than one list page.
pub fn prp_plan(iova: u64, len: usize) -> Option<(u64, Prp2)> {
    if len == 0 || iova & 3 != 0 {
        return None;
    }
    let first_page = iova & !(PAGE - 1);
    let end = iova.checked_add(len as u64)?;
    let pages = (end - first_page).div_ceil(PAGE);
    let later = (1..pages).map(|i| first_page + i * PAGE);
    let p2 = match pages {
        1 => Prp2::None,
        2 => Prp2::Page(first_page + PAGE),
        n if (n - 1) as usize <= PRPS_PER_PAGE => Prp2::List(later.collect()),
        _ => return None,
    };
    Some((iova, p2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_command_dwords() {
        // READ, CID 5, NSID 1, PRP1 0x1234_5000, SLBA 0x1_0000_0010, 8 blocks:
        // CDW0 = 0x02 | 5 << 16; CDW12 = NLB - 1 = 7.
        let prp = Prp {
            prp1: 0x1234_5000,
            prp2: 0xabcd_e000_0000_1000,
        };
        let s = Sqe::rw(nvm::READ, 5, 1, 0x1_0000_0010, 8, &prp);
        assert_eq!(
            s.0,
            [
                0x0005_0002,
                1,
                0,
                0,
                0,
                0,
                0x1234_5000,
                0,
                0x0000_1000,
                0xabcd_e000,
                0x0000_0010,
                0x0000_0001,
                7,
                0,
                0,
                0
            ]
        );
        assert_eq!(s.cid(), 5);
        // WRITE opcode 0x01 with CID 0xffff.
        assert_eq!(Sqe::rw(nvm::WRITE, 0xffff, 1, 0, 1, &prp).0[0], 0xffff_0001);
        assert_eq!(Sqe::rw(nvm::WRITE, 0, 1, 0, 1, &prp).0[12], 0);
    }

    #[test]
    fn admin_command_dwords() {
        let id = Sqe::identify(1, 0, cns::CONTROLLER, 0x8000);
        assert_eq!(id.0[0], 0x0001_0006);
        assert_eq!((id.0[6], id.0[10]), (0x8000, 1));
        let ns = Sqe::identify(2, 1, cns::NAMESPACE, 0x9000);
        assert_eq!((ns.0[0], ns.0[1], ns.0[10]), (0x0002_0006, 1, 0));
        // Two queue pairs: NCQR = NSQR = 1 → CDW11 0x0001_0001, FID 7.
        let f = Sqe::set_num_queues(3, 2);
        assert_eq!((f.0[0], f.0[10], f.0[11]), (0x0003_0009, 7, 0x0001_0001));
        // CQ 1 of 64 entries at 0x7000: CDW10 = 63 << 16 | 1, CDW11 = PC.
        let cq = Sqe::create_cq(4, 1, 64, 0x7000);
        assert_eq!(
            (cq.0[0], cq.0[6], cq.0[10], cq.0[11]),
            (0x0004_0005, 0x7000, 0x003f_0001, 1)
        );
        // SQ 2 of 64 entries on CQ 2: CDW11 = 2 << 16 | PC.
        let sq = Sqe::create_sq(5, 2, 64, 2, 0x6000);
        assert_eq!(
            (sq.0[0], sq.0[10], sq.0[11]),
            (0x0005_0001, 0x003f_0002, 0x0002_0001)
        );
        assert_eq!(
            Sqe::delete_queue(6, admin::DELETE_SQ, 2).0[..1],
            [0x0006_0000]
        );
        assert_eq!(Sqe::flush(7, 1).0[..2], [0x0007_0000, 1]);
    }

    #[test]
    fn completion_entry_fields() {
        // DW2: SQID 1, SQHD 9; DW3: CID 0x1234, phase 1, status 0.
        let c = Cqe::decode([0xdead_beef, 0, 0x0001_0009, 0x0001_1234]);
        assert_eq!(
            (c.result, c.sq_id, c.sq_head, c.cid, c.phase),
            (0xdead_beef, 1, 9, 0x1234, true)
        );
        assert!(c.ok());
        // Data transfer error (SCT 0, SC 4) with DNR, phase 0:
        // status = 1 << 14 | 4 = 0x4004, DW3 = 0x4004 << 17 | CID 7 = 0x8008_0007.
        let e = Cqe::decode([0, 0, 0, 0x8008_0007]);
        assert_eq!(
            (e.cid, e.phase, e.sc(), e.sct(), e.dnr()),
            (7, false, 4, 0, true)
        );
        assert!(!e.ok());
        assert_eq!(status_name(e.sct(), e.sc()), "data transfer error");
        // LBA out of range: SCT 0 SC 0x80 → DW3 = 0x80 << 17 = 0x0100_0000.
        let r = Cqe::decode([0, 0, 0, 0x0100_0000]);
        assert_eq!((r.sc(), r.sct()), (0x80, 0));
        // Invalid queue identifier: SCT 1 SC 1 → status 0x101 → DW3 0x0202_0000.
        let q = Cqe::decode([0, 0, 0, 0x0202_0000]);
        assert_eq!((q.sct(), q.sc()), (1, 1));
    }

    #[test]
    fn prp_plans() {
        assert_eq!(prp_plan(0x10000, 4096), Some((0x10000, Prp2::None)));
        assert_eq!(prp_plan(0x10000, 512), Some((0x10000, Prp2::None)));
        assert_eq!(
            prp_plan(0x10000, 8192),
            Some((0x10000, Prp2::Page(0x11000)))
        );
        // 512 bytes at offset 0xf00 straddle two pages.
        assert_eq!(prp_plan(0x10f00, 512), Some((0x10f00, Prp2::Page(0x11000))));
        // 12 KiB at offset 0x200 touch four pages: PRP1 keeps the offset, the list
        // holds the other three.
        assert_eq!(
            prp_plan(0x10200, 0x3000),
            Some((0x10200, Prp2::List(vec![0x11000, 0x12000, 0x13000])))
        );
        // 128 KiB page aligned: 32 pages, a list of 31 entries 0x11000..=0x2f000.
        match prp_plan(0x10000, 128 << 10) {
            Some((0x10000, Prp2::List(l))) => {
                assert_eq!(l.len(), 31);
                assert_eq!((l[0], l[30]), (0x11000, 0x2f000));
            }
            other => panic!("unexpected plan {other:?}"),
        }
        // 513 pages fill one list page exactly (512 entries); 514 need a chained
        // list: refused; so are empty and unaligned transfers.
        assert!(prp_plan(0, 513 * 4096).is_some());
        assert_eq!(prp_plan(0, 514 * 4096), None);
        assert_eq!(prp_plan(0x10000, 0), None);
        assert_eq!(prp_plan(0x10002, 16), None);
    }
}
