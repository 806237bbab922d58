//! Jobs: a configuration file naming repositories, hosts and jobs
//! ([`config`]), the VMs a job selects from a pool's inventory
//! ([`select`]), and a run's report ([`report`]). Pure; `commands::run`
//! reads the file, talks to the hosts and runs the backups.

pub mod config;
pub mod report;
pub mod select;
