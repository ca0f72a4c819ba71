//! Second-level page tables of one domain, with reclamation of empty tables.
//!
//! The tables are real VT-d second-level tables (VT-d 3.x §9.8: 512 8-byte
//! entries per 4 KiB table; R bit 0, W bit 1, address 51:12) in memory the
//! IOMMU walks. iommud keeps, beside them, a count of present entries per
//! table so it knows when a table becomes empty.
//!
//! **Reclamation.** When an unmap leaves a table with no present entry, the
//! table is unlinked from its parent and returned to the caller as
//! *detached*. It must not be freed yet: the IOMMU's paging-structure caches
//! may still point at it until an invalidation that covers its range has
//! completed (VT-d 3.x §6.5.2). The domain frees detached tables only after
//! that invalidation (see `domain.rs`). Reclamation can be switched off to
//! reproduce the research's page-table blowup.
//!
//! Until that invalidation, the range a detached table covered must not get
//! a *new* table either: a paging-structure cache may still lead a walk into
//! the detached one. So a map there links the detached table (still zeroed,
//! still owned) back in instead of allocating one, and the cached walk and
//! the tables agree again; [`PageTable::release_detached`] tells the domain
//! whether a parked table is still detached (free it) or was revived (keep).
//!
//! **Pinned leaf tables.** In delegated trust mode the client writes leaf
//! entries itself into leaf tables iommud installs for the IOVA ranges it
//! delegates; iommud cannot count those entries, so such tables are pinned:
//! never reclaimed while the domain lives.

use crate::hw::{HwError, PhysMem};
use std::collections::HashMap;
use vtd::entry::{level_index, level_size, SlPte, ENTRIES_PER_TABLE, PTE_BYTES};

/// 4 KiB page.
pub const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy)]
struct TableInfo {
    level: u8,
    present: u16,
    pinned: bool,
}

/// Errors of page-table operations.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    /// The memory seam failed.
    #[error(transparent)]
    Hw(#[from] HwError),
    /// Mapping over a present entry.
    #[error("iova {0:#x} is already mapped")]
    AlreadyMapped(u64),
    /// Unmapping a non-present entry.
    #[error("iova {0:#x} is not mapped")]
    NotMapped(u64),
    /// Address not page-aligned or beyond the address width.
    #[error("iova {0:#x} is unaligned or beyond the address width")]
    BadAddress(u64),
}

/// Counters of table pages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableCounts {
    /// Table pages allocated (including the root).
    pub allocated: u64,
    /// Table pages detached for reclamation.
    pub detached: u64,
    /// Table pages live (allocated − detached).
    pub live: u64,
}

/// One domain's second-level page table.
#[derive(Debug)]
pub struct PageTable {
    root: u64,
    levels: u8,
    tables: HashMap<u64, TableInfo>,
    reclaim: bool,
    coherent: bool,
    counts: TableCounts,
    /// Detached tables not yet released, by (first IOVA, level of the table).
    detached: HashMap<(u64, u8), u64>,
}

impl PageTable {
    /// A table with an empty root of `levels` levels (3 = 39-bit, 4 = 48-bit).
    pub fn new(
        mem: &dyn PhysMem,
        levels: u8,
        reclaim: bool,
        coherent: bool,
    ) -> Result<PageTable, PtError> {
        let root = mem.alloc_frame()?;
        let mut tables = HashMap::new();
        tables.insert(
            root,
            TableInfo {
                level: levels,
                present: 0,
                pinned: true,
            },
        );
        Ok(PageTable {
            root,
            levels,
            tables,
            reclaim,
            coherent,
            counts: TableCounts {
                allocated: 1,
                detached: 0,
                live: 1,
            },
            detached: HashMap::new(),
        })
    }

    /// A table that owns no memory (what a torn-down domain keeps).
    pub fn placeholder() -> PageTable {
        PageTable {
            root: 0,
            levels: 0,
            tables: HashMap::new(),
            reclaim: false,
            coherent: true,
            counts: TableCounts::default(),
            detached: HashMap::new(),
        }
    }

    /// Physical address of the root table (SLPTPTR).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Levels of the walk.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Table page counters.
    pub fn counts(&self) -> TableCounts {
        self.counts
    }

    /// Switches reclamation of empty tables on or off.
    pub fn set_reclaim(&mut self, on: bool) {
        self.reclaim = on;
    }

    /// First IOVA beyond the address width of the walk.
    pub fn limit(&self) -> u64 {
        1u64 << (12 + 9 * u32::from(self.levels))
    }

    fn write_entry(&self, mem: &dyn PhysMem, at: u64, v: u64) -> Result<(), HwError> {
        mem.write_u64(at, v)?;
        if !self.coherent {
            mem.flush(at, PTE_BYTES as u64);
        }
        Ok(())
    }

    /// Walks from the root down to the table at level `stop` covering
    /// `iova`, creating missing tables on the way if `create`; `None` if a
    /// table is absent and not created.
    fn table_at(
        &mut self,
        mem: &dyn PhysMem,
        iova: u64,
        stop: u8,
        create: bool,
    ) -> Result<Option<u64>, PtError> {
        let mut table = self.root;
        for level in (stop + 1..=self.levels).rev() {
            let at = table + (level_index(iova, level) * PTE_BYTES) as u64;
            let e = SlPte(mem.read_u64(at)?);
            table = if e.present() {
                e.addr()
            } else if create {
                let slot = (iova & !(level_size(level) - 1), level - 1);
                let t = match self.detached.remove(&slot) {
                    Some(t) => t, // revived: empty, and what a cached walk expects
                    None => {
                        self.counts.allocated += 1;
                        mem.alloc_frame()?
                    }
                };
                self.tables.insert(
                    t,
                    TableInfo {
                        level: level - 1,
                        present: 0,
                        pinned: false,
                    },
                );
                self.counts.live += 1;
                self.write_entry(mem, at, SlPte::table(t).0)?;
                if let Some(p) = self.tables.get_mut(&table) {
                    p.present += 1;
                }
                t
            } else {
                return Ok(None);
            };
        }
        Ok(Some(table))
    }

    /// The leaf table (level 1) covering `iova`, see [`PageTable::table_at`].
    fn leaf_table(
        &mut self,
        mem: &dyn PhysMem,
        iova: u64,
        create: bool,
    ) -> Result<Option<u64>, PtError> {
        self.table_at(mem, iova, 1, create)
    }

    /// Maps `pages` 4 KiB pages from `iova` to `phys` with the given rights.
    /// On error nothing stays mapped.
    pub fn map(
        &mut self,
        mem: &dyn PhysMem,
        iova: u64,
        phys: u64,
        pages: u64,
        read: bool,
        write: bool,
    ) -> Result<(), PtError> {
        if !iova.is_multiple_of(PAGE)
            || !phys.is_multiple_of(PAGE)
            || iova.saturating_add(pages * PAGE) > self.limit()
        {
            return Err(PtError::BadAddress(iova));
        }
        for i in 0..pages {
            let va = iova + i * PAGE;
            let r = self.map_one(mem, va, phys + i * PAGE, read, write);
            if let Err(e) = r {
                if i > 0 {
                    // Roll back what this call mapped; the entries were never
                    // handed to anyone, so no invalidation is owed for them
                    // except under caching mode, which the caller handles.
                    let _ = self.unmap(mem, iova, i);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn map_one(
        &mut self,
        mem: &dyn PhysMem,
        iova: u64,
        phys: u64,
        read: bool,
        write: bool,
    ) -> Result<(), PtError> {
        let Some(leaf) = self.leaf_table(mem, iova, true)? else {
            return Err(PtError::BadAddress(iova));
        };
        let at = leaf + (level_index(iova, 1) * PTE_BYTES) as u64;
        if SlPte(mem.read_u64(at)?).present() {
            return Err(PtError::AlreadyMapped(iova));
        }
        self.write_entry(mem, at, SlPte::new(phys, read, write).0)?;
        if let Some(t) = self.tables.get_mut(&leaf) {
            t.present += 1;
        }
        Ok(())
    }

    /// Clears `pages` entries from `iova`. Returns the tables detached
    /// because they became empty (free them only after an invalidation
    /// covering them completed). Pages not mapped give `NotMapped` after the
    /// mapped ones were cleared.
    pub fn unmap(&mut self, mem: &dyn PhysMem, iova: u64, pages: u64) -> Result<Vec<u64>, PtError> {
        let mut detached = Vec::new();
        let mut missing = None;
        for i in 0..pages {
            let va = iova + i * PAGE;
            let Some(leaf) = self.leaf_table(mem, va, false)? else {
                missing.get_or_insert(va);
                continue;
            };
            let at = leaf + (level_index(va, 1) * PTE_BYTES) as u64;
            if !SlPte(mem.read_u64(at)?).present() {
                missing.get_or_insert(va);
                continue;
            }
            self.write_entry(mem, at, 0)?;
            let empty = match self.tables.get_mut(&leaf) {
                Some(t) if !t.pinned => {
                    t.present = t.present.saturating_sub(1);
                    t.present == 0
                }
                _ => false,
            };
            if empty && self.reclaim {
                self.detach_upwards(mem, va, &mut detached)?;
            }
        }
        match missing {
            Some(va) if detached.is_empty() && pages == 1 => Err(PtError::NotMapped(va)),
            _ => Ok(detached),
        }
    }

    /// Unlinks empty tables on the path of `iova`, bottom up.
    fn detach_upwards(
        &mut self,
        mem: &dyn PhysMem,
        iova: u64,
        out: &mut Vec<u64>,
    ) -> Result<(), PtError> {
        // Path of tables from the root down to the leaf.
        let mut path = vec![self.root];
        for level in (2..=self.levels).rev() {
            let Some(&t) = path.last() else { break };
            let e = SlPte(mem.read_u64(t + (level_index(iova, level) * PTE_BYTES) as u64)?);
            if !e.present() {
                return Ok(());
            }
            path.push(e.addr());
        }
        // Walk back up: detach each empty, unpinned table from its parent.
        for w in (1..path.len()).rev() {
            let (child, parent) = (path[w], path[w - 1]);
            let Some(info) = self.tables.get(&child).copied() else {
                return Ok(());
            };
            if info.pinned || info.present != 0 {
                return Ok(());
            }
            let parent_level = info.level + 1;
            let at = parent + (level_index(iova, parent_level) * PTE_BYTES) as u64;
            self.write_entry(mem, at, 0)?;
            self.tables.remove(&child);
            self.detached
                .insert((iova & !(level_size(parent_level) - 1), info.level), child);
            self.counts.detached += 1;
            self.counts.live -= 1;
            out.push(child);
            if let Some(p) = self.tables.get_mut(&parent) {
                p.present = p.present.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Installs `leaf` (a zeroed table page the caller owns, e.g. in a
    /// client-shared arena) as the pinned leaf table of the 2 MiB range
    /// containing `iova`. Fails if a leaf table is already there.
    pub fn install_leaf(&mut self, mem: &dyn PhysMem, iova: u64, leaf: u64) -> Result<(), PtError> {
        let chunk = iova & !(level_size(2) - 1);
        if chunk >= self.limit() {
            return Err(PtError::BadAddress(iova));
        }
        // Create the path down to level 2 (a level-2 table holds the leaf pointer).
        let table = self
            .table_at(mem, chunk, 2, true)?
            .ok_or(PtError::BadAddress(iova))?;
        let at = table + (level_index(chunk, 2) * PTE_BYTES) as u64;
        if SlPte(mem.read_u64(at)?).present() {
            return Err(PtError::AlreadyMapped(chunk));
        }
        self.write_entry(mem, at, SlPte::table(leaf).0)?;
        self.tables.insert(
            leaf,
            TableInfo {
                level: 1,
                present: 0,
                pinned: true,
            },
        );
        if let Some(p) = self.tables.get_mut(&table) {
            p.present += 1;
        }
        Ok(())
    }

    /// The invalidation covering detached table `table` completed: true if
    /// it is still detached (the caller frees it now), false if a map
    /// revived it since.
    pub fn release_detached(&mut self, table: u64) -> bool {
        let slot = self
            .detached
            .iter()
            .find_map(|(k, t)| (*t == table).then_some(*k));
        slot.map(|k| self.detached.remove(&k)).is_some()
    }

    /// Rewrites the rights of the present leaf entry of `iova` (the caller
    /// invalidates it: VT-d 3.x §6.5: any change of a present entry).
    pub fn protect(
        &mut self,
        mem: &dyn PhysMem,
        iova: u64,
        read: bool,
        write: bool,
    ) -> Result<(), PtError> {
        let leaf = self
            .leaf_table(mem, iova, false)?
            .ok_or(PtError::NotMapped(iova))?;
        let at = leaf + (level_index(iova, 1) * PTE_BYTES) as u64;
        let e = SlPte(mem.read_u64(at)?);
        if !e.present() {
            return Err(PtError::NotMapped(iova));
        }
        self.write_entry(mem, at, SlPte::new(e.addr(), read, write).0)?;
        Ok(())
    }

    /// Unlinks the pinned leaf table installed at `iova` by
    /// [`PageTable::install_leaf`] (the caller invalidates before reusing
    /// the page); returns whether one was there.
    pub fn uninstall_leaf(&mut self, mem: &dyn PhysMem, iova: u64) -> Result<bool, PtError> {
        let chunk = iova & !(level_size(2) - 1);
        let mut table = self.root;
        for level in (3..=self.levels).rev() {
            let e = SlPte(mem.read_u64(table + (level_index(chunk, level) * PTE_BYTES) as u64)?);
            if !e.present() {
                return Ok(false);
            }
            table = e.addr();
        }
        let at = table + (level_index(chunk, 2) * PTE_BYTES) as u64;
        let e = SlPte(mem.read_u64(at)?);
        if !e.present() {
            return Ok(false);
        }
        self.write_entry(mem, at, 0)?;
        self.tables.remove(&e.addr());
        if let Some(p) = self.tables.get_mut(&table) {
            p.present = p.present.saturating_sub(1);
        }
        Ok(true)
    }

    /// Software walk: the 4 KiB translation of `iova`, if present.
    pub fn translate(&self, mem: &dyn PhysMem, iova: u64) -> Result<Option<SlPte>, PtError> {
        let mut table = self.root;
        for level in (1..=self.levels).rev() {
            let e = SlPte(mem.read_u64(table + (level_index(iova, level) * PTE_BYTES) as u64)?);
            if !e.present() {
                return Ok(None);
            }
            if level == 1 {
                return Ok(Some(e));
            }
            table = e.addr();
        }
        Ok(None)
    }

    /// All table pages iommud allocated, detached ones not yet released
    /// included (not pinned leaves owned by others),
    /// for freeing at domain teardown; the table must not be used after.
    pub fn teardown(self, owned_by_caller: impl Fn(u64) -> bool) -> Vec<u64> {
        self.tables
            .keys()
            .chain(self.detached.values())
            .copied()
            .filter(|p| !owned_by_caller(*p))
            .collect()
    }

    /// Number of table pages iommud tracks (live), the root included.
    pub fn live(&self) -> usize {
        self.tables.len()
    }

    /// Entries per table (for the client's arena arithmetic).
    pub const ENTRIES: usize = ENTRIES_PER_TABLE;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Plain memory standing in for physical memory (frames from a bump list).
    pub(crate) struct VecMem {
        pub bytes: Mutex<Vec<u8>>,
        pub free: Mutex<Vec<u64>>,
        pub next: Mutex<u64>,
    }

    impl VecMem {
        pub(crate) fn new(size: usize) -> VecMem {
            VecMem {
                bytes: Mutex::new(vec![0; size]),
                free: Mutex::new(Vec::new()),
                next: Mutex::new(PAGE),
            }
        }
    }

    impl PhysMem for VecMem {
        fn alloc_frame(&self) -> Result<u64, HwError> {
            let p = self.free.lock().unwrap().pop().unwrap_or_else(|| {
                let mut n = self.next.lock().unwrap();
                *n += PAGE;
                *n - PAGE
            });
            let mut b = self.bytes.lock().unwrap();
            b[p as usize..(p + PAGE) as usize].fill(0);
            Ok(p)
        }
        fn free_frame(&self, phys: u64) {
            self.free.lock().unwrap().push(phys);
        }
        fn alloc_region(&self, _len: u64, _align: u64) -> Result<crate::hw::Region, HwError> {
            Err(HwError::NoMemory("test"))
        }
        fn free_region(&self, _r: &crate::hw::Region) {}
        fn read_u64(&self, phys: u64) -> Result<u64, HwError> {
            let b = self.bytes.lock().unwrap();
            let s = b
                .get(phys as usize..phys as usize + 8)
                .ok_or(HwError::BadPhys(phys))?;
            Ok(u64::from_le_bytes(s.try_into().unwrap()))
        }
        fn write_u64(&self, phys: u64, v: u64) -> Result<(), HwError> {
            let mut b = self.bytes.lock().unwrap();
            let s = b
                .get_mut(phys as usize..phys as usize + 8)
                .ok_or(HwError::BadPhys(phys))?;
            s.copy_from_slice(&v.to_le_bytes());
            Ok(())
        }
        fn read_u32(&self, phys: u64) -> Result<u32, HwError> {
            Ok(self.read_u64(phys)? as u32)
        }
        fn flush(&self, _phys: u64, _len: u64) {}
    }

    #[test]
    fn map_writes_the_entries_a_hand_walk_finds() {
        let mem = VecMem::new(1 << 20);
        let mut pt = PageTable::new(&mem, 3, true, true).unwrap();
        // IOVA 0x4020_3000: level-3 index 1 (bits 38:30), level-2 index 1
        // (bits 29:21), level-1 index 3 (bits 20:12).
        pt.map(&mem, 0x4020_3000, 0x77_7000, 1, true, false)
            .unwrap();
        let l3 = mem.read_u64(pt.root() + 8).unwrap();
        assert_eq!(l3 & 3, 3, "non-leaf entries carry R|W");
        let l2 = mem.read_u64((l3 & !0xfff) + 8).unwrap();
        let leaf = mem.read_u64((l2 & !0xfff) + 3 * 8).unwrap();
        assert_eq!(leaf, 0x77_7000 | 1, "read-only leaf: address | R");
        assert_eq!(pt.counts().live, 3);
        assert!(matches!(
            pt.map(&mem, 0x4020_3000, 0x1000, 1, true, true),
            Err(PtError::AlreadyMapped(_))
        ));
    }

    #[test]
    fn sparse_unmap_returns_to_the_root_baseline_with_reclaim_and_not_without() {
        for reclaim in [true, false] {
            let mem = VecMem::new(8 << 20);
            let mut pt = PageTable::new(&mem, 3, reclaim, true).unwrap();
            let iovas: Vec<u64> = (0..40u64)
                .map(|i| (i * 0x2345_6000 % (1 << 39)) & !0xfff)
                .collect();
            for (i, &va) in iovas.iter().enumerate() {
                pt.map(&mem, va, (i as u64 + 1) << 12, 1, true, true)
                    .unwrap();
            }
            let peak = pt.counts().live;
            assert!(peak > 40, "sparse IOVAs need many tables: {peak}");
            let mut detached = Vec::new();
            for &va in &iovas {
                detached.extend(pt.unmap(&mem, va, 1).unwrap());
            }
            if reclaim {
                assert_eq!(pt.counts().live, 1, "only the root stays");
                assert_eq!(detached.len() as u64, peak - 1);
                // The root is empty again.
                for i in 0..512 {
                    assert_eq!(mem.read_u64(pt.root() + i * 8).unwrap(), 0);
                }
            } else {
                assert_eq!(pt.counts().live, peak);
                assert!(detached.is_empty());
            }
        }
    }

    #[test]
    fn pinned_leaf_tables_are_never_detached() {
        let mem = VecMem::new(1 << 20);
        let mut pt = PageTable::new(&mem, 3, true, true).unwrap();
        let leaf = mem.alloc_frame().unwrap();
        pt.install_leaf(&mem, 0x4000_0000, leaf).unwrap();
        pt.map(&mem, 0x4000_5000, 0x9000, 1, true, true).unwrap();
        assert_eq!(mem.read_u64(leaf + 5 * 8).unwrap(), 0x9003);
        assert!(pt.unmap(&mem, 0x4000_5000, 1).unwrap().is_empty());
        assert_eq!(pt.translate(&mem, 0x4000_5000).unwrap(), None);
        assert!(
            pt.install_leaf(&mem, 0x4010_0000, leaf).is_err(),
            "same 2 MiB chunk"
        );
    }
}
