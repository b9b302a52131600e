//! The proxy listener's room: the process's file-descriptor limit raised to its hard limit,
//! and `max_connections` fitted under it (each client connection may hold an upstream one).
//! The per-connection bounds themselves live in the HTTP/1 path's connection loop (`h1`).

/// Raises the soft file-descriptor limit to the hard one and returns both (0, 0 if unknown),
/// so a flood of connections meets `max_connections` before the process runs out.
pub fn raise_fd_limit() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0);
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return (hard, hard);
    }
    (soft, hard)
}

/// File descriptors kept for everything but client connections (upstream connections, the
/// snapshot file, sync, health, logs).
pub const FD_RESERVE: u64 = 512;

/// `max_connections`, lowered when the file-descriptor limit cannot hold it: each client
/// connection may need an upstream one too.
pub fn fit_max_connections(wanted: usize, fd_soft: u64) -> usize {
    if fd_soft == 0 {
        return wanted;
    }
    let room = (fd_soft.saturating_sub(FD_RESERVE) / 2).max(1) as usize;
    wanted.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_fits_the_descriptor_limit() {
        assert_eq!(fit_max_connections(10_000, 1_048_576), 10_000);
        assert_eq!(fit_max_connections(10_000, 1024), 256);
        assert_eq!(fit_max_connections(10_000, 100), 1);
        assert_eq!(fit_max_connections(10_000, 0), 10_000);
        let (soft, hard) = raise_fd_limit();
        assert!(soft > 0 && soft == hard, "soft {soft} raised to hard {hard}");
    }
}
