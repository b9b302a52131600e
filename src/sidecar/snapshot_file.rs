//! The on-disk copy of the last applied snapshot, so a sidecar restarted while the admin plane
//! is down still serves. Written atomically (temp file, fsync, rename); read whole and validated
//! before use, never half-applied.

use std::io::Write;
use std::path::Path;

use crate::core::key::Environment;
use crate::core::snapshot::{Snapshot, SnapshotError};
use crate::core::sync::SyncPayload;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("reading snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot file is not valid JSON for a snapshot: {0}")]
    Json(#[from] serde_json::Error),
    #[error("snapshot file holds a delta, not a full snapshot")]
    NotFull,
    #[error("snapshot file content is invalid: {0}")]
    Invalid(#[from] SnapshotError),
}

/// `Ok(None)` when there is no file.
pub fn load(path: &Path, environment: Environment) -> Result<Option<Snapshot>, SnapshotFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let payload: SyncPayload = serde_json::from_slice(&bytes)?;
    if !payload.full {
        return Err(SnapshotFileError::NotFull);
    }
    Ok(Some(Snapshot::from_full(&payload, environment, None)?))
}

pub fn write(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, &snapshot.to_payload())?;
        f.flush()?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::key;
    use crate::core::snapshot::tests::{service, sync_key};

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        assert!(load(&path, Environment::Live).unwrap().is_none());
        let k = key::generate(Environment::Live);
        let payload = SyncPayload {
            epoch: "e".into(),
            version: 7,
            full: true,
            services: vec![service("srv_a", &["a:b"], vec![sync_key("key_1", &k)])],
            ..Default::default()
        };
        let snap = Snapshot::from_full(&payload, Environment::Live, None).unwrap();
        write(&path, &snap).unwrap();
        let back = load(&path, Environment::Live).unwrap().unwrap();
        assert_eq!(back.version, 7);
        assert!(back.lookup(&k.hash).is_some());

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(k.secret.expose()), "the file holds hashes only");
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            load(&path, Environment::Live),
            Err(SnapshotFileError::Json(_))
        ));
        std::fs::write(&path, text.replace("10.", "999.").replace("\"a:b\"", "\"a::b\"")).unwrap();
        assert!(matches!(
            load(&path, Environment::Live),
            Err(SnapshotFileError::Invalid(_))
        ));
    }
}
