//! A job run's report: what each VM's backup did, the steps after it, the
//! run's result and exit status; rendered as a table, as JSON (the same
//! fields), and as Prometheus text-format metrics. Pure: the runner fills
//! it in, the command edge writes it.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How something ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Done, but something needs attention (the warnings say what).
    Warnings,
    Failed,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warnings => "warnings",
            Status::Failed => "FAILED",
        }
    }
}

/// One VM's backup in a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmResult {
    #[serde(rename = "vm_uuid")]
    pub uuid: String,
    pub name: String,
    /// The configured host (pool) it was backed up through.
    pub host: String,
    /// The physical host it ran on, when running.
    pub resident_on: Option<String>,
    #[serde(rename = "disk_count")]
    pub disks: usize,
    #[serde(rename = "excluded_disk_count")]
    pub excluded_disks: usize,
    /// `full`, `incremental`, or `mixed` (some disks each); None when it
    /// failed before a disk was committed.
    pub mode: Option<String>,
    /// Why disks were read in full (a new chain, lost tracking).
    pub full_reasons: Vec<String>,
    #[serde(rename = "read_bytes")]
    pub bytes_read: u64,
    #[serde(rename = "stored_bytes")]
    pub bytes_stored: u64,
    pub vm_backup_id: Option<String>,
    #[serde(rename = "start_time")]
    pub started: DateTime<Utc>,
    #[serde(rename = "end_time")]
    pub finished: DateTime<Utc>,
    #[serde(rename = "duration_seconds")]
    pub seconds: f64,
    pub status: Status,
    /// Why it failed.
    pub error: Option<String>,
    pub warnings: Vec<String>,
}

/// A step after the backups (retention, an offsite copy, a read-back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    /// `retention`, `copy to NAME`, `verify VM`.
    pub step: String,
    pub status: Status,
    /// One line of what it did, or why it failed.
    pub detail: String,
    #[serde(rename = "duration_seconds")]
    pub seconds: f64,
}

/// A VM the selection matched but that was not backed up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassedVm {
    #[serde(rename = "vm_uuid")]
    pub uuid: String,
    pub name: String,
    pub reason: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// `YYYYMMDDTHHMMSSZ-JOB`: the report file's name without `.json`.
    pub run_id: String,
    pub job: String,
    pub repository: String,
    #[serde(rename = "start_time")]
    pub started: DateTime<Utc>,
    #[serde(rename = "end_time")]
    pub finished: DateTime<Utc>,
    #[serde(rename = "duration_seconds")]
    pub seconds: f64,
    pub concurrency: usize,
    pub status: Status,
    pub vms: Vec<VmResult>,
    pub passed: Vec<PassedVm>,
    pub steps: Vec<StepResult>,
    /// Failures not of one VM (a host that could not be listed).
    pub errors: Vec<String>,
}

/// The run id of a run of `job` started at `started` (milliseconds: a
/// second run of a quick job may start within the same second).
pub fn run_id(job: &str, started: DateTime<Utc>) -> String {
    format!("{}-{job}", started.format("%Y%m%dT%H%M%S%.3fZ"))
}

impl RunReport {
    /// The run's status: failed when any VM failed, a host could not be
    /// listed or a step failed; warnings when anything warned.
    pub fn compute_status(&self) -> Status {
        let worst = self
            .vms
            .iter()
            .map(|v| v.status)
            .chain(self.steps.iter().map(|s| s.status))
            .max()
            .unwrap_or(Status::Ok);
        if !self.errors.is_empty() {
            Status::Failed
        } else {
            worst
        }
    }

    /// VMs whose backup failed.
    pub fn failed_vms(&self) -> usize {
        self.vms
            .iter()
            .filter(|v| v.status == Status::Failed)
            .count()
    }

    /// Nothing was backed up although something was to be: every VM (at
    /// least one) failed, or a host could not be listed and no VM ran.
    pub fn nothing_done(&self) -> bool {
        (!self.vms.is_empty() && self.failed_vms() == self.vms.len())
            || (self.vms.is_empty() && !self.errors.is_empty())
    }

    /// The table shown on the terminal.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 8]> = vec![[
            "VM".into(),
            "Disks".into(),
            "Mode".into(),
            "Read".into(),
            "Stored".into(),
            "Time".into(),
            "Result".into(),
            "Detail".into(),
        ]];
        for v in &self.vms {
            let disks = if v.excluded_disks > 0 {
                format!("{} (+{} excl.)", v.disks, v.excluded_disks)
            } else {
                v.disks.to_string()
            };
            let detail = match (&v.error, v.full_reasons.first(), v.warnings.first()) {
                (Some(e), _, _) => e.clone(),
                (None, _, Some(w)) => w.clone(),
                (None, Some(r), None) => format!("full: {r}"),
                (None, None, None) => String::new(),
            };
            rows.push([
                v.name.clone(),
                disks,
                v.mode.clone().unwrap_or_else(|| "-".into()),
                crate::output::human_bytes(v.bytes_read),
                crate::output::human_bytes(v.bytes_stored),
                format!("{:.1}s", v.seconds),
                v.status.word().into(),
                one_line(&detail, 100),
            ]);
        }
        let mut widths = [0usize; 8];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (n, r) in rows.iter().enumerate() {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i == 7 {
                    line.push_str(c);
                } else {
                    let _ = write!(line, "{c:<w$}  ", w = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
            if n == 0 {
                let total: usize = widths.iter().sum::<usize>() + 14;
                out.push_str(&"-".repeat(total.min(120)));
                out.push('\n');
            }
        }
        for p in &self.passed {
            let _ = writeln!(out, "not backed up: {} ({})", p.name, p.reason);
        }
        for s in &self.steps {
            let _ = writeln!(
                out,
                "{}: {} ({:.1}s) {}",
                s.step,
                s.status.word(),
                s.seconds,
                s.detail
            );
        }
        for e in &self.errors {
            let _ = writeln!(out, "error: {e}");
        }
        let _ = writeln!(
            out,
            "job '{}': {} of {} VMs ok, {} failed, in {:.1}s: {}",
            self.job,
            self.vms.len() - self.failed_vms(),
            self.vms.len(),
            self.failed_vms(),
            self.seconds,
            self.status.word()
        );
        out
    }

    /// Prometheus text-format metrics of this run, with each VM's last
    /// success time taken from `last_success` (uuid -> time) where this
    /// run did not succeed for it.
    pub fn metrics(&self, last_success: &dyn Fn(&str) -> Option<DateTime<Utc>>) -> String {
        let mut out = String::new();
        let job = escape(&self.job);
        let gauge = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP cbtvault_{name} {help}");
            let _ = writeln!(out, "# TYPE cbtvault_{name} gauge");
        };
        gauge(
            &mut out,
            "job_last_run_timestamp_seconds",
            "When the job's last run finished.",
        );
        let _ = writeln!(
            out,
            "cbtvault_job_last_run_timestamp_seconds{{job=\"{job}\"}} {}",
            self.finished.timestamp()
        );
        gauge(
            &mut out,
            "job_last_run_status",
            "0 ok, 1 completed with warnings, 2 failed.",
        );
        let _ = writeln!(
            out,
            "cbtvault_job_last_run_status{{job=\"{job}\"}} {}",
            self.status as u8
        );
        gauge(
            &mut out,
            "job_last_run_duration_seconds",
            "Wall time of the job's last run.",
        );
        let _ = writeln!(
            out,
            "cbtvault_job_last_run_duration_seconds{{job=\"{job}\"}} {:.3}",
            self.seconds
        );
        gauge(
            &mut out,
            "job_vms_failed",
            "VMs whose backup failed in the last run.",
        );
        let _ = writeln!(
            out,
            "cbtvault_job_vms_failed{{job=\"{job}\"}} {}",
            self.failed_vms()
        );
        let per_vm: [(&str, &str, &VmValue); 5] = [
            (
                "vm_last_success_timestamp_seconds",
                "When the VM's last successful backup finished.",
                &|v| {
                    let t = if v.status != Status::Failed {
                        Some(v.finished)
                    } else {
                        last_success(&v.uuid)
                    };
                    t.map(|t| t.timestamp().to_string())
                },
            ),
            (
                "vm_last_run_success",
                "1 when the VM's backup in the last run succeeded.",
                &|v| Some(u8::from(v.status != Status::Failed).to_string()),
            ),
            (
                "vm_bytes_read",
                "Bytes read from the VM's disks in the last run.",
                &|v| Some(v.bytes_read.to_string()),
            ),
            (
                "vm_bytes_stored",
                "Bytes the last run added to the repository for the VM.",
                &|v| Some(v.bytes_stored.to_string()),
            ),
            (
                "vm_duration_seconds",
                "Wall time of the VM's backup in the last run.",
                &|v| Some(format!("{:.3}", v.seconds)),
            ),
        ];
        for (name, help, value) in per_vm {
            gauge(&mut out, name, help);
            for v in &self.vms {
                if let Some(x) = value(v) {
                    let _ = writeln!(
                        out,
                        "cbtvault_{name}{{job=\"{job}\",vm=\"{}\",uuid=\"{}\"}} {x}",
                        escape(&v.name),
                        escape(&v.uuid)
                    );
                }
            }
        }
        out
    }
}

/// One per-VM metric's value of a VM (None: no sample).
type VmValue<'a> = dyn Fn(&VmResult) -> Option<String> + 'a;

/// A label value escaped as the text format wants (`\\`, `\"`, `\n`).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `text` on one line, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut s: String = flat.chars().take(max - 3).collect();
        s.push_str("...");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + s, 0).unwrap()
    }

    fn vm(name: &str, status: Status) -> VmResult {
        VmResult {
            uuid: format!("uuid-{name}"),
            name: name.into(),
            host: "pool1".into(),
            resident_on: None,
            disks: 2,
            excluded_disks: 0,
            mode: Some("incremental".into()),
            full_reasons: vec![],
            bytes_read: 1 << 20,
            bytes_stored: 1 << 19,
            vm_backup_id: None,
            started: t(0),
            finished: t(10),
            seconds: 10.0,
            status,
            error: (status == Status::Failed).then(|| "VM.snapshot: SR_FULL".to_string()),
            warnings: vec![],
        }
    }

    fn report(vms: Vec<VmResult>) -> RunReport {
        let mut r = RunReport {
            run_id: run_id("daily", t(0)),
            job: "daily".into(),
            repository: "main".into(),
            started: t(0),
            finished: t(20),
            seconds: 20.0,
            concurrency: 2,
            status: Status::Ok,
            vms,
            passed: vec![],
            steps: vec![],
            errors: vec![],
        };
        r.status = r.compute_status();
        r
    }

    #[test]
    fn status_and_counts() {
        let r = report(vec![vm("a", Status::Ok), vm("b", Status::Warnings)]);
        assert_eq!(r.status, Status::Warnings);
        let r = report(vec![vm("a", Status::Ok), vm("b", Status::Failed)]);
        assert_eq!(
            (r.status, r.failed_vms(), r.nothing_done()),
            (Status::Failed, 1, false)
        );
        let r = report(vec![vm("b", Status::Failed)]);
        assert!(r.nothing_done());
        let mut r = report(vec![]);
        assert_eq!(r.status, Status::Ok);
        r.errors.push("host pool2: login failed".into());
        assert_eq!(r.compute_status(), Status::Failed);
        assert!(r.nothing_done());
        assert_eq!(r.run_id, "20260528T202640.000Z-daily");
    }

    #[test]
    fn table_and_json_carry_the_same_facts() {
        let r = report(vec![vm("web-01", Status::Ok), vm("db-01", Status::Failed)]);
        let table = r.table();
        assert!(
            table.contains("web-01") && table.contains("1.0 MiB"),
            "{table}"
        );
        assert!(
            table.contains("FAILED") && table.contains("SR_FULL"),
            "{table}"
        );
        assert!(table.contains("1 of 2 VMs ok, 1 failed"), "{table}");
        let json = serde_json::to_string(&r).unwrap();
        let back: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.vms.len(), 2);
        assert_eq!(back.vms[1].status, Status::Failed);
        assert_eq!(back.status, Status::Failed);
    }

    #[test]
    fn metrics_keep_the_last_success_of_a_failed_vm() {
        let r = report(vec![vm("web-01", Status::Ok), vm("d\"b", Status::Failed)]);
        let earlier = t(-86_400);
        let m = r.metrics(&|u| (u == "uuid-d\"b").then_some(earlier));
        assert!(m.contains(&format!(
            "cbtvault_vm_last_success_timestamp_seconds{{job=\"daily\",vm=\"web-01\",uuid=\"uuid-web-01\"}} {}",
            t(10).timestamp()
        )), "{m}");
        assert!(m.contains(&format!(
            "cbtvault_vm_last_success_timestamp_seconds{{job=\"daily\",vm=\"d\\\"b\",uuid=\"uuid-d\\\"b\"}} {}",
            earlier.timestamp()
        )), "{m}");
        assert!(m.contains(
            "cbtvault_vm_last_run_success{job=\"daily\",vm=\"d\\\"b\",uuid=\"uuid-d\\\"b\"} 0"
        ));
        assert!(m.contains("cbtvault_job_vms_failed{job=\"daily\"} 1"));
        assert!(m.contains("cbtvault_job_last_run_status{job=\"daily\"} 2"));
        // Every sample line is NAME{LABELS} VALUE, and every name has a TYPE.
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap();
            assert!(m.contains(&format!("# TYPE {name} gauge")), "{line}");
            assert!(
                line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(),
                "{line}"
            );
        }
    }
}
