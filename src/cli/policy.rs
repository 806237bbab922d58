//! `forget`'s policy options (restic's `--keep-*`), and their conversion
//! into a validated `repo::policy::Policy` and `GroupBy`.

use anyhow::{anyhow, Result};
use clap::Args;

use crate::commands::forget_policy::GroupBy;
use crate::repo::policy::{Count, Period, Policy, Span};

#[derive(Debug, Args, Default, Clone)]
pub struct PolicyArgs {
    /// Keep the N newest snapshots (or 'unlimited').
    #[arg(long, value_name = "N")]
    pub keep_last: Option<String>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<String>,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<String>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<String>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<String>,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<String>,
    /// Keep every snapshot newer than the newest one minus DURATION (e.g. 1y5m7d2h).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep the newest snapshot of each hour within DURATION of the newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_hourly: Option<String>,
    /// Keep the newest snapshot of each day within DURATION of the newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_daily: Option<String>,
    /// Keep the newest snapshot of each week within DURATION of the newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_weekly: Option<String>,
    /// Keep the newest snapshot of each month within DURATION of the newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_monthly: Option<String>,
    /// Keep the newest snapshot of each year within DURATION of the newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_yearly: Option<String>,
    /// Keep snapshots carrying every tag of TAG[,TAG...] (repeatable).
    #[arg(long = "keep-tag", value_name = "TAG[,TAG...]")]
    pub keep_tag: Vec<String>,
    /// Apply the policy to each group of snapshots sharing these fields:
    /// source, host, tags (comma-separated; '' for one group).
    #[arg(long, value_name = "FIELDS", default_value = "source")]
    pub group_by: String,
}

impl PolicyArgs {
    /// The policy and grouping; a malformed value names its option.
    pub fn to_policy(&self) -> Result<(Policy, GroupBy)> {
        let count = |name: &str, v: &Option<String>| -> Result<Option<Count>> {
            v.as_deref()
                .map(|t| Count::parse(t).map_err(|e| anyhow!("--{name}: {e}")))
                .transpose()
        };
        let span = |name: &str, v: &Option<String>| -> Result<Option<Span>> {
            v.as_deref()
                .map(|t| Span::parse(t).map_err(|e| anyhow!("--{name}: {e}")))
                .transpose()
        };
        let mut p = Policy {
            last: count("keep-last", &self.keep_last)?,
            within: span("keep-within", &self.keep_within)?,
            ..Policy::default()
        };
        let counted = [
            &self.keep_hourly,
            &self.keep_daily,
            &self.keep_weekly,
            &self.keep_monthly,
            &self.keep_yearly,
        ];
        let within = [
            &self.keep_within_hourly,
            &self.keep_within_daily,
            &self.keep_within_weekly,
            &self.keep_within_monthly,
            &self.keep_within_yearly,
        ];
        for (i, period) in Period::ALL.into_iter().enumerate() {
            if let Some(c) = count(&format!("keep-{}", period.name()), counted[i])? {
                p.set_period(period, c);
            }
            if let Some(s) = span(&format!("keep-within-{}", period.name()), within[i])? {
                p.set_within_period(period, s);
            }
        }
        for list in &self.keep_tag {
            let tags: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect();
            if tags.is_empty() {
                return Err(anyhow!("--keep-tag '{list}' names no tag"));
            }
            p.tags.push(tags);
        }
        let group_by = GroupBy::parse(&self.group_by).map_err(|e| anyhow!(e))?;
        Ok((p, group_by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_names_the_bad_option() {
        let a = PolicyArgs {
            keep_last: Some("3".into()),
            keep_daily: Some("unlimited".into()),
            keep_within_weekly: Some("2m".into()),
            keep_tag: vec!["a,b".into()],
            group_by: "source,host".into(),
            ..PolicyArgs::default()
        };
        let (p, g) = a.to_policy().unwrap();
        assert_eq!(
            p.to_string(),
            "--keep-last 3 --keep-daily unlimited --keep-within-weekly 2m --keep-tag a,b"
        );
        assert!(g.source && g.host && !g.tags);
        let bad = PolicyArgs {
            keep_weekly: Some("0".into()),
            group_by: "source".into(),
            ..PolicyArgs::default()
        };
        let e = bad.to_policy().unwrap_err().to_string();
        assert!(e.starts_with("--keep-weekly:"), "{e}");
        let bad = PolicyArgs {
            keep_within: Some("3w".into()),
            group_by: "source".into(),
            ..PolicyArgs::default()
        };
        let e = bad.to_policy().unwrap_err().to_string();
        assert!(e.starts_with("--keep-within:"), "{e}");
    }
}
