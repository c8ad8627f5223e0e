//! The process's file-descriptor limit, which bounds how many connections it can hold.

/// File descriptors the process keeps for everything but client connections: Kafka, MongoDB
/// and Redis connections, sled's files, logs, librdkafka's pipes.
pub const RESERVED_FDS: usize = 1024;

fn nofile() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass and reads nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    ok.then_some(lim)
}

/// The process's file-descriptor limit (its soft `RLIMIT_NOFILE`), if it can be read.
pub fn fd_limit() -> Option<usize> {
    nofile().map(|lim| usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX))
}

/// Raises the soft file-descriptor limit to the hard one, as servers that hold many
/// connections do at start-up (the soft limit is often 1,024); returns the limit in force.
pub fn raise_fd_limit() -> Option<usize> {
    if let Some(lim) = nofile().filter(|l| l.rlim_cur < l.rlim_max) {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; a refusal leaves the limit as it was.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    }
    fd_limit()
}

/// The connection cap that fits `fds` file descriptors with [`RESERVED_FDS`] (or half of a
/// smaller limit) kept for the rest: `max_connections`, or less when the limit is too low for
/// it (`0`, no cap, stays).
/// Past the limit `accept` fails, and so would every other file the process opens: its Kafka,
/// MongoDB and Redis connections too.
pub fn fit_to_fds(max_connections: usize, fds: Option<usize>) -> usize {
    match fds {
        Some(fds) if max_connections > 0 => {
            let reserved = RESERVED_FDS.min(fds / 2);
            max_connections.min(fds.saturating_sub(reserved).max(1))
        }
        _ => max_connections,
    }
}
