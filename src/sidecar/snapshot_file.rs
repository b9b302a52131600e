//! The on-disk copy of the last applied snapshot, so a sidecar restarted while the admin plane
//! is down still serves.
//!
//! The file is authenticated: its first line carries a keyed blake3 MAC of the rest, with a key
//! derived from the sidecar's sync credential, so someone who can write the file but does not
//! hold the credential cannot grant a scope by editing it. A file that does not verify (edited,
//! truncated, from another version, or written under another sync credential, e.g. after the
//! credential was rotated) is refused with a log line, and the sidecar fails closed until its
//! first sync. Written through a fresh temp file created exclusively (never through a symlink
//! someone planted), fsynced, then renamed over the old one; read whole and validated before
//! use, never half-applied.

use std::io::Write;
use std::path::Path;

use crate::core::key::{Environment, Secret};
use crate::core::snapshot::{Snapshot, SnapshotError};
use crate::core::sync::SyncPayload;

/// First bytes of the header line; the MAC in hex follows, a space, the unix second the file
/// was written (inside the MAC, so the snapshot's age cannot be faked by `touch`), then '\n'
/// and the JSON payload.
const MAGIC: &str = "permiso-snapshot-v2 blake3-keyed:";
const MAC_CONTEXT: &str = "permiso 2026-12 snapshot file MAC";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("reading snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot file has no valid header (written by an older version, or not a snapshot file)")]
    NoHeader,
    #[error("snapshot file does not verify: edited, or written under another sync credential")]
    BadMac,
    #[error("snapshot file is not valid JSON for a snapshot: {0}")]
    Json(#[from] serde_json::Error),
    #[error("snapshot file holds a delta, not a full snapshot")]
    NotFull,
    #[error("snapshot file content is invalid: {0}")]
    Invalid(#[from] SnapshotError),
}

/// The key that authenticates this sidecar's snapshot file.
#[derive(Clone)]
pub struct FileKey([u8; 32]);

impl FileKey {
    /// Derived from the sync credential (which never goes in the file).
    pub fn from_credential(credential: &Secret) -> FileKey {
        FileKey(blake3::derive_key(MAC_CONTEXT, credential.expose().as_bytes()))
    }

    fn mac(&self, written_at: i64, body: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&written_at.to_le_bytes());
        h.update(body);
        h.finalize()
    }
}

/// The snapshot and the unix second it was written; `Ok(None)` when there is no file.
pub fn load(
    path: &Path,
    environment: Environment,
    key: &FileKey,
) -> Result<Option<(Snapshot, i64)>, SnapshotFileError> {
    Ok(load_with_instance(path, environment, key)?.map(|(s, at, _)| (s, at)))
}

/// As `load`, with the instance id the file keeps (see `SyncPayload::instance_id`).
pub fn load_with_instance(
    path: &Path,
    environment: Environment,
    key: &FileKey,
) -> Result<Option<(Snapshot, i64, Option<String>)>, SnapshotFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(SnapshotFileError::NoHeader)?;
    let (header, body) = (&bytes[..nl], &bytes[nl + 1..]);
    let (mac_hex, written_at) = std::str::from_utf8(header)
        .ok()
        .and_then(|h| h.strip_prefix(MAGIC))
        .and_then(|h| h.split_once(' '))
        .ok_or(SnapshotFileError::NoHeader)?;
    let written_at: i64 = written_at.parse().map_err(|_| SnapshotFileError::NoHeader)?;
    let stored = blake3::Hash::from_hex(mac_hex).map_err(|_| SnapshotFileError::NoHeader)?;
    // blake3::Hash equality is constant-time.
    if stored != key.mac(written_at, body) {
        return Err(SnapshotFileError::BadMac);
    }
    let payload: SyncPayload = serde_json::from_slice(body)?;
    if !payload.full {
        return Err(SnapshotFileError::NotFull);
    }
    Ok(Some((
        Snapshot::from_full(&payload, environment, None)?,
        written_at,
        payload.instance_id,
    )))
}

/// `written_at`: unix seconds by the sidecar's clock, the snapshot's age after a restart.
pub fn write(path: &Path, snapshot: &Snapshot, key: &FileKey, written_at: i64) -> std::io::Result<()> {
    write_with_instance(path, snapshot, key, written_at, None)
}

/// As `write`, keeping the sidecar's instance id in the file.
pub fn write_with_instance(
    path: &Path,
    snapshot: &Snapshot,
    key: &FileKey,
    written_at: i64,
    instance_id: Option<&str>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut payload = snapshot.to_payload();
    payload.instance_id = instance_id.map(str::to_string);
    let body = serde_json::to_vec(&payload)?;
    let header = format!("{MAGIC}{} {written_at}\n", key.mac(written_at, &body).to_hex());
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot");
    // A name nobody can guess, created exclusively (O_CREAT|O_EXCL fails on an existing name,
    // symlinks included), readable by this user only.
    let tmp = dir.join(format!(".{file_name}.tmp-{:016x}", rand::random::<u64>()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(header.as_bytes())?;
        f.write_all(&body)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
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
    use crate::core::snapshot::fixtures::{service, sync_key};

    fn snapshot(k: &key::NewKey) -> Snapshot {
        let payload = SyncPayload {
            epoch: "e".into(),
            version: 7,
            full: true,
            services: vec![service("srv_a", &["a:b"], vec![sync_key("key_1", k)])],
            ..Default::default()
        };
        Snapshot::from_full(&payload, Environment::Live, None).unwrap()
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        let fk = FileKey::from_credential(&Secret::new("svc_live_sync".into()));
        assert!(load(&path, Environment::Live, &fk).unwrap().is_none());
        let k = key::generate(Environment::Live);
        write(&path, &snapshot(&k), &fk, 1_800_000_000).unwrap();
        let (back, written_at) = load(&path, Environment::Live, &fk).unwrap().unwrap();
        assert_eq!(written_at, 1_800_000_000);
        assert_eq!(back.version, 7);
        assert!(back.lookup(&k.hash).is_some());

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(k.secret.expose()), "the file holds hashes only");
        // Another credential (a rotated sync key) does not verify it.
        let other = FileKey::from_credential(&Secret::new("svc_live_other".into()));
        assert!(matches!(
            load(&path, Environment::Live, &other),
            Err(SnapshotFileError::BadMac)
        ));
        // Any edit of the body: a scope granted, one byte changed, truncation.
        for edited in [
            text.replace("\"a:b\"", "\"a:b\",\"admin:*\""),
            // A fresher-looking write time (an old file passed off as new).
            text.replacen(" 1800000000\n", " 1800000999\n", 1),
            text.replacen("7", "8", 1),
            text[..text.len() / 2].to_string(),
        ] {
            std::fs::write(&path, &edited).unwrap();
            assert!(
                matches!(
                    load(&path, Environment::Live, &fk),
                    Err(SnapshotFileError::BadMac)
                ),
                "{edited:.80}"
            );
        }
        // The old format (plain JSON) and garbage have no header.
        let (_, json) = text.split_once('\n').unwrap();
        std::fs::write(&path, json).unwrap();
        assert!(matches!(
            load(&path, Environment::Live, &fk),
            Err(SnapshotFileError::NoHeader)
        ));
        std::fs::write(&path, "garbage\n{}").unwrap();
        assert!(matches!(
            load(&path, Environment::Live, &fk),
            Err(SnapshotFileError::NoHeader)
        ));
        // A correct MAC over content that is not a valid snapshot is still refused.
        let bad = br#"{"epoch":"e","version":1,"full":true,"services":[{"service_id":"srv_a","service_name":"n","environment":"live","scopes":["a::b"],"disabled":false,"allowed_ips":[],"keys":[]}]}"#;
        std::fs::write(
            &path,
            [format!("{MAGIC}{} 5\n", fk.mac(5, bad).to_hex()).as_bytes(), bad].concat(),
        )
        .unwrap();
        assert!(load(&path, Environment::Live, &fk).is_err());
    }

    #[test]
    fn writes_never_follow_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // Symlinks at the old predictable temp names, and at the target itself.
        for name in [
            ".snap.json.tmp",
            &format!(".snap.json.tmp-{}", std::process::id()),
        ] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let fk = FileKey::from_credential(&Secret::new("k".into()));
        let k = key::generate(Environment::Live);
        write(&path, &snapshot(&k), &fk, 1).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A symlink at the target is replaced by the rename, not written through.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write(&path, &snapshot(&k), &fk, 1).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-") && !e.path().is_symlink())
            .collect();
        assert!(left.is_empty());
    }
}
