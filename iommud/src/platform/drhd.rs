//! Platform-free facts about a DRHD (one VT-d unit), shared by the `linux`
//! platform and iommud's Redox backend: which unit to drive and how many bytes
//! of registers to map.

use linuxhw::dmar::{Dmar, Drhd};
use linuxhw::PAGE_SIZE;
use vtd::regs::{Cap, Ecap};

/// Upper bound on the register span we will map (VT-d offsets are at most 0x3ff0 + 256 * 16).
pub const MAX_REG_SPAN: usize = 0x1_0000;

/// Bytes of register space a unit with these CAP/ECAP values needs mapped, rounded up to
/// whole 4 KiB pages and at least `min` (e.g. from the DRHD size field).
///
/// VT-d 3.x §10.4.2/§10.4.3: the fault recording registers (128 bits each, NFR+1 of them)
/// start at CAP.FRO * 16; the IOTLB registers (IVA at +0, IOTLB at +8) at ECAP.IRO * 16.
pub fn register_span(cap: u64, ecap: u64, min: usize) -> usize {
    let cap = Cap(cap);
    let ecap = Ecap(ecap);
    let frcd_end = cap.fro_bytes() + usize::from(cap.nfr()) * 16;
    let iotlb_end = ecap.iro_bytes() + 16;
    let need = frcd_end.max(iotlb_end).max(min).max(PAGE_SIZE);
    // Both offsets are 10-bit fields times 16 and NFR <= 256, so `need` is small unless `min`
    // is absurd; clamp so a corrupt DRHD size cannot make us map megabytes of MMIO.
    need.min(MAX_REG_SPAN).next_multiple_of(PAGE_SIZE)
}

/// The DRHD iommud drives: the first with INCLUDE_PCI_ALL, else the first listed.
pub fn choose_drhd(dmar: &Dmar) -> Option<&Drhd> {
    dmar.drhds
        .iter()
        .find(|d| d.include_pci_all())
        .or_else(|| dmar.drhds.first())
}
