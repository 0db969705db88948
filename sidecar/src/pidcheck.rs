//! Is the PID in a pidfile still the mailer? A pidfile outlives its process (a crash, an OOM
//! kill); once the PID is reused, signalling it would hit a stranger (SIGUSR1 and SIGUSR2 kill
//! by default), possibly the sidecar itself in a shared PID namespace. Before every signal:
//!
//! - the PID is not this process, and exists;
//! - the process started no later than the pidfile was last written (plus [`START_SLACK`] for
//!   the kernel's coarse boot time): a mailer writes its pidfile after it starts, so a process
//!   younger than the file is a reused PID;
//! - with `reload.process` set, its name (`/proc/<pid>/comm`, or the file name of
//!   `/proc/<pid>/exe`) is that name.
//!
//! The verdict is a pure function of what `/proc` says ([`verdict`]); reading `/proc` is
//! [`inspect`].

use std::path::Path;
use std::time::{Duration, SystemTime};

/// Tolerance for comparing a process's start time with the pidfile's mtime: the boot time in
/// `/proc/stat` has one-second resolution.
pub const START_SLACK: Duration = Duration::from_secs(2);
/// Longest name `/proc/<pid>/comm` keeps (TASK_COMM_LEN - 1).
const COMM_LEN: usize = 15;

/// What `/proc` says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub start: SystemTime,
    /// `/proc/<pid>/comm` (truncated to 15 bytes by the kernel).
    pub comm: String,
    /// File name of `/proc/<pid>/exe`, when readable.
    pub exe: Option<String>,
}

/// May `pid` be signalled as the mailer?
pub fn verdict(
    pid: i32,
    own_pid: i32,
    info: &ProcInfo,
    pidfile_mtime: SystemTime,
    expected: Option<&str>,
) -> Result<(), String> {
    if pid == own_pid {
        return Err(format!(
            "names pid {pid}, which is this sidecar; not signalling"
        ));
    }
    if info.start > pidfile_mtime + START_SLACK {
        let late = info
            .start
            .duration_since(pidfile_mtime)
            .unwrap_or_default()
            .as_secs();
        return Err(format!(
            "process {pid} started after the pidfile was written ({late}s later): the mailer \
             that wrote it is gone and its PID was reused by {:?}; not signalling",
            info.comm
        ));
    }
    if let Some(want) = expected {
        let comm_ok = info.comm == want
            || (want.len() > COMM_LEN && want.as_bytes().starts_with(info.comm.as_bytes()));
        if !comm_ok && info.exe.as_deref() != Some(want) {
            return Err(format!(
                "process {pid} is {:?}, not {want:?} (reload.process); not signalling",
                info.comm
            ));
        }
    }
    Ok(())
}

/// Reads `/proc/<pid>`: start time, name, executable.
pub fn inspect(pid: i32) -> Result<ProcInfo, String> {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let stat = std::fs::read_to_string(proc_dir.join("stat"))
        .map_err(|_| format!("process {pid} does not exist (a stale pidfile?)"))?;
    let ticks = start_ticks(&stat).ok_or_else(|| format!("cannot parse /proc/{pid}/stat"))?;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(boot_time)
        .ok_or("cannot read the boot time from /proc/stat")?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|h| *h > 0)
        .unwrap_or(100) as u64;
    let since_boot = Duration::from_secs(ticks / hz)
        + Duration::from_nanos((ticks % hz).saturating_mul(1_000_000_000) / hz);
    let start = SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(boot))
        .and_then(|b| b.checked_add(since_boot))
        .ok_or("process start time out of range")?;
    let comm = std::fs::read_to_string(proc_dir.join("comm"))
        .map(|c| c.trim_end_matches('\n').to_string())
        .unwrap_or_default();
    let exe = std::fs::read_link(proc_dir.join("exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok(ProcInfo { start, comm, exe })
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks after boot). The command name in
/// field 2 may contain spaces and parentheses, so fields are counted after its last ')'.
pub fn start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `btime` from `/proc/stat`: boot time, seconds since the epoch.
pub fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn info(start: u64, comm: &str) -> ProcInfo {
        ProcInfo {
            start: at(start),
            comm: comm.into(),
            exe: Some(comm.into()),
        }
    }

    #[test]
    fn a_process_younger_than_its_pidfile_is_a_reused_pid() {
        let written = at(1_000);
        assert!(verdict(42, 7, &info(990, "opendkim"), written, None).is_ok());
        assert!(
            verdict(42, 7, &info(1_001, "opendkim"), written, None).is_ok(),
            "within slack"
        );
        let e = verdict(42, 7, &info(1_100, "sleep"), written, None).unwrap_err();
        assert!(e.contains("started after") && e.contains("sleep"), "{e}");
    }

    #[test]
    fn the_sidecar_never_signals_itself() {
        let e = verdict(7, 7, &info(1, "keyroll-sidecar"), at(10), None).unwrap_err();
        assert!(e.contains("this sidecar"), "{e}");
    }

    #[test]
    fn an_expected_name_must_match_comm_or_exe() {
        let w = at(1_000);
        assert!(verdict(42, 7, &info(10, "opendkim"), w, Some("opendkim")).is_ok());
        let e = verdict(42, 7, &info(10, "sleep"), w, Some("opendkim")).unwrap_err();
        assert!(e.contains("\"sleep\", not \"opendkim\""), "{e}");
        // comm is truncated to 15 bytes; exe carries the full name.
        let long = ProcInfo {
            start: at(10),
            comm: "a-very-long-mai".into(),
            exe: Some("a-very-long-mailer".into()),
        };
        assert!(verdict(42, 7, &long, w, Some("a-very-long-mailer")).is_ok());
        let no_exe = ProcInfo { exe: None, ..long };
        assert!(verdict(42, 7, &no_exe, w, Some("a-very-long-mailer")).is_ok());
    }

    #[test]
    fn proc_stat_fields_are_found_after_the_command_name() {
        let stat = "7957 (a b) c) R 7858 7858 12483 0 -1 4194304 129 0 0 0 0 0 0 0 20 0 1 0 \
                    219155 3133440 360";
        assert_eq!(start_ticks(stat), Some(219_155));
        assert_eq!(start_ticks("garbage"), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1795778452\nprocesses 9\n"),
            Some(1_795_778_452)
        );
    }

    #[test]
    fn this_process_is_seen_as_started_before_now() {
        let me = inspect(std::process::id() as i32).unwrap();
        assert!(me.start <= SystemTime::now() + START_SLACK);
        assert!(!me.comm.is_empty());
        assert!(inspect(i32::MAX).is_err());
    }
}
