//! `results.json` (one object per row) and the text table on stdout.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::harness::RowResult;

/// One row of `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonRow {
    /// IOVA strategy, or a peer: `noiommu`, `limit`, `vm-allocator`.
    pub strategy: String,
    /// Flush policy (`none` where nothing is invalidated).
    pub flush: String,
    /// Threads per client process.
    pub threads: usize,
    /// Client processes.
    pub processes: usize,
    /// Pages per mapping.
    pub pages: u64,
    /// Trust mode: `delegated`, `validated`, or `none` (peers, translation off).
    pub trust: String,
    /// Maps (and unmaps) per request.
    pub batch: usize,
    /// Median over runs of per-thread nanoseconds per map+unmap pair.
    pub ns_per_pair: f64,
    /// Smallest run's ns per pair.
    pub ns_min: f64,
    /// Largest run's ns per pair.
    pub ns_max: f64,
    /// Median aggregate throughput, million pairs per second.
    pub mpairs_per_s: f64,
    /// Blocking IPC round trips per 1000 pairs.
    pub ipc_per_1k: f64,
    /// One-way wake-ups per 1000 pairs.
    pub wakeups_per_1k: f64,
    /// Shared-lock acquisitions per 1000 pairs.
    pub locks_per_1k: f64,
    /// IOTLB invalidations per 1000 pairs.
    pub inval_per_1k: f64,
    /// Page-table pages live at the end.
    pub pt_pages: u64,
    /// Runs the median is taken over.
    pub runs: usize,
}

impl From<&RowResult> for JsonRow {
    fn from(r: &RowResult) -> JsonRow {
        JsonRow {
            strategy: r.row.strategy.clone(),
            flush: r.row.flush.clone(),
            threads: r.row.threads,
            processes: r.row.processes,
            pages: r.row.pages,
            trust: r.row.trust.clone(),
            batch: r.row.batch,
            ns_per_pair: r.ns.median,
            ns_min: r.ns.min,
            ns_max: r.ns.max,
            mpairs_per_s: r.mpairs_per_s,
            ipc_per_1k: r.ipc_per_1k,
            wakeups_per_1k: r.wakeups_per_1k,
            locks_per_1k: r.locks_per_1k,
            inval_per_1k: r.inval_per_1k,
            pt_pages: r.pt_pages,
            runs: r.runs,
        }
    }
}

/// The JSON text: an array with one object per row.
pub fn to_json(rows: &[RowResult]) -> String {
    let v: Vec<JsonRow> = rows.iter().map(JsonRow::from).collect();
    serde_json::to_string_pretty(&v).expect("dmabench: rows serialise")
}

/// Write `results.json` into `dir`.
pub fn write_json(dir: &Path, rows: &[RowResult]) -> io::Result<()> {
    std::fs::write(dir.join("results.json"), to_json(rows) + "\n")
}

/// Header line of the text table.
pub const TABLE_HEADER: &str = "strategy     flush    thr proc pages   ns/pair (min-max)          Mpair/s  ipc/1k wake/1k locks/1k inval/1k pt_pages";

/// One line of the text table.
pub fn table_line(r: &RowResult) -> String {
    let mut s = String::new();
    let ns = format!("{:.1} ({:.1}-{:.1})", r.ns.median, r.ns.min, r.ns.max);
    let _ = write!(
        s,
        "{:<12} {:<8} {:>3} {:>4} {:>5}   {:<25} {:>8.2} {:>7.1} {:>7.1} {:>8.1} {:>8.1} {:>8}",
        r.row.strategy,
        r.row.flush,
        r.row.threads,
        r.row.processes,
        r.row.pages,
        ns,
        r.mpairs_per_s,
        r.ipc_per_1k,
        r.wakeups_per_1k,
        r.locks_per_1k,
        r.inval_per_1k,
        r.pt_pages
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{Row, Spread};

    fn sample() -> RowResult {
        RowResult {
            row: Row {
                strategy: "vm-allocator".into(),
                flush: "strict".into(),
                threads: 2,
                processes: 1,
                pages: 4,
                trust: "none".into(),
                batch: 1,
            },
            ns: Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0,
            },
            mpairs_per_s: 1.0,
            ipc_per_1k: 0.0,
            wakeups_per_1k: 0.0,
            locks_per_1k: 2000.0,
            inval_per_1k: 1000.0,
            pt_pages: 3,
            runs: 3,
        }
    }

    #[test]
    fn json_has_the_exact_field_names() {
        let text = to_json(&[sample()]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rows = v.as_array().expect("top level is an array");
        assert_eq!(rows.len(), 1);
        let o = rows[0].as_object().expect("row is an object");
        for k in [
            "strategy",
            "flush",
            "threads",
            "processes",
            "pages",
            "trust",
            "batch",
            "ns_per_pair",
            "ipc_per_1k",
            "wakeups_per_1k",
            "locks_per_1k",
            "inval_per_1k",
            "pt_pages",
        ] {
            assert!(o.contains_key(k), "missing {k}");
        }
        assert_eq!(o["strategy"], "vm-allocator");
        assert_eq!(
            (o["trust"].as_str(), o["batch"].as_u64()),
            (Some("none"), Some(1))
        );
        assert_eq!(o["threads"], 2);
        assert_eq!(o["ns_per_pair"], 2.0);
        assert_eq!(o["locks_per_1k"], 2000.0);
        let back: Vec<JsonRow> = serde_json::from_str(&text).unwrap();
        assert_eq!(back[0], JsonRow::from(&sample()));
    }

    #[test]
    fn table_line_lines_up_with_header() {
        let l = table_line(&sample());
        assert!(l.starts_with("vm-allocator strict"));
        assert_eq!(l.len(), TABLE_HEADER.len());
    }
}
