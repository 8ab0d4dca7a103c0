// TEMP STUB (not committed)
use std::path::Path;
pub const VERSION: u32 = 0;
pub struct Spec {
    pub files: u64,
    pub bytes: u64,
    pub seed: u64,
}
pub fn generate(_out: &Path, _spec: &Spec) -> anyhow::Result<()> {
    anyhow::bail!("stub")
}
