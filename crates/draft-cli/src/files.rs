//! Reading a diffusers model folder and tensor files from disk.

use std::path::Path;

use anyhow::{Context, Result, bail};
use draft_core::ModelFiles;

/// Reads every file of the diffusers layout that exists under `dir`.
pub fn read_model_dir(dir: &Path) -> Result<ModelFiles> {
    if !dir.is_dir() {
        bail!("{}: model folder not found", dir.display());
    }
    ModelFiles::read_layout(dir.display().to_string(), |rel| {
        let path = dir.join(rel);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Ok(Some(bytes))
    })
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        // Flushed to disk before the rename: a crash leaves the old file or the new one.
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
