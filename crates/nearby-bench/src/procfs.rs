//! CPU and memory of processes and of the whole machine, from `/proc`.
//!
//! A step's server CPU is the sum over every `--server-pid` (the nodes, and
//! Redis and PostgreSQL if given); the machine's busy CPU is read beside it,
//! so that a run disturbed by other load shows as such.

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU counters at one instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    /// utime + stime of each pid, ticks (`None`: the process was not there).
    per_pid: Vec<Option<u64>>,
    /// The whole machine: (busy, total) ticks over all cores.
    machine: Option<(u64, u64)>,
}

/// CPU over an interval between two samples.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUse {
    /// Cores the listed processes used together (`None` with no pid, or
    /// one of them gone).
    pub server_cores: Option<f64>,
    /// Cores of each listed process, in `--server-pid` order.
    pub per_pid_cores: Vec<Option<f64>>,
    /// Cores the whole machine was busy (everything but idle and iowait).
    pub machine_busy_cores: Option<f64>,
}

impl CpuSample {
    /// Reads the counters of `pids` and of the machine now.
    pub fn now(pids: &[u32]) -> Self {
        CpuSample {
            per_pid: pids.iter().map(|p| cpu_ticks(*p)).collect(),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| parse_machine(&s)),
        }
    }

    /// CPU used from `self` to `later`, over `window_s` seconds.
    pub fn until(&self, later: &CpuSample, window_s: f64) -> CpuUse {
        let window_s = window_s.max(1e-9);
        let per_pid: Vec<Option<u64>> = self
            .per_pid
            .iter()
            .zip(&later.per_pid)
            .map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?)))
            .collect();
        let server = (!per_pid.is_empty())
            .then(|| per_pid.iter().copied().sum::<Option<u64>>())
            .flatten();
        let cores = |t: u64| t as f64 / TICKS_PER_S / window_s;
        let machine = self.machine.zip(later.machine).and_then(|(a, b)| {
            let total = b.1.checked_sub(a.1)?;
            let busy = b.0.checked_sub(a.0)?;
            // Ticks over all cores, over elapsed ticks of one: cores.
            let cores = cores_from(total, window_s);
            (total > 0).then(|| busy as f64 / total as f64 * cores)
        });
        CpuUse {
            server_cores: server.map(cores),
            per_pid_cores: per_pid.into_iter().map(|t| t.map(cores)).collect(),
            machine_busy_cores: machine,
        }
    }
}

/// The number of cores that account for `total` ticks in `window_s`,
/// rounded: the machine's cores (counted from its ticks, not assumed).
fn cores_from(total: u64, window_s: f64) -> f64 {
    (total as f64 / TICKS_PER_S / window_s).round().max(1.0)
}

/// (busy, total) ticks of the machine from `/proc/stat`'s first line:
/// `cpu user nice system idle iowait irq softirq steal guest guest_nice`.
/// Idle and iowait are not busy; guest time is already in user.
fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if f.len() < 5 {
        return None;
    }
    let total: u64 = f.iter().sum();
    let idle = f[3] + f[4];
    Some((total - idle, total))
}

/// utime + stime of `pid`, ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_pid_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime from a `/proc/<pid>/stat` line: the 14th and 15th fields,
/// counted after the parenthesised command name (which may hold spaces
/// and parentheses).
fn parse_pid_stat(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

/// Resident set size of `pid`, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    parse_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_rss(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Server CPU per delivery, µs: `cores` busy while `deliveries_per_s`
/// were delivered.
pub fn us_per_delivery(cores: Option<f64>, deliveries_per_s: f64) -> Option<f64> {
    cores
        .filter(|_| deliveries_per_s > 0.0)
        .map(|c| c * 1e6 / deliveries_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (nearby (a) b) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 567 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_pid_stat(line), Some(1234 + 567));
        assert_eq!(parse_pid_stat("4242 (x) S 1 2"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_machine(stat), Some((160, 1000)));
        assert_eq!(parse_machine("intr 1 2 3"), None);
    }

    #[test]
    fn server_cpu_sums_every_pid_and_machine_cpu_counts_cores() {
        let a = CpuSample {
            per_pid: vec![Some(100), Some(50)],
            machine: Some((1_000, 4_000)),
        };
        // 2 s on 2 cores: 400 ticks in all; 300 busy.
        let b = CpuSample {
            per_pid: vec![Some(200), Some(90)],
            machine: Some((1_300, 4_400)),
        };
        let u = a.until(&b, 2.0);
        assert_eq!(u.server_cores, Some(1.4 / 2.0));
        assert_eq!(u.per_pid_cores, vec![Some(0.5), Some(0.2)]);
        assert_eq!(u.machine_busy_cores, Some(1.5));
        // A pid that went away spoils the server sum, not the machine's.
        let gone = CpuSample {
            per_pid: vec![Some(200), None],
            machine: b.machine,
        };
        assert_eq!(a.until(&gone, 2.0).server_cores, None);
        let none = CpuSample {
            per_pid: vec![],
            machine: None,
        };
        assert_eq!(none.until(&none, 2.0).server_cores, None);
    }

    #[test]
    fn rss_is_read_in_bytes() {
        assert_eq!(parse_rss("Name:\tx\nVmRSS:\t  2048 kB\n"), Some(2 << 20));
        assert_eq!(parse_rss("Name:\tx\n"), None);
    }

    #[test]
    fn cpu_per_delivery_in_microseconds() {
        assert_eq!(us_per_delivery(Some(0.5), 50_000.0), Some(10.0));
        assert_eq!(us_per_delivery(Some(0.5), 0.0), None);
        assert_eq!(us_per_delivery(None, 10.0), None);
    }
}
