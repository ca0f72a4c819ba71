//! x
#[derive(Debug, thiserror::Error)]
#[error("x")]
/// x
pub enum DmarError {}
