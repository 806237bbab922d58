//! `key list|add|remove|passwd`: the passwords of an encrypted repository
//! (spec: format-spec/09-encryption.md#key-object).

use anyhow::Result;
use serde_json::json;

use super::Outcome;
use crate::output::Ui;
use crate::repo::{NewKey, Repository};

pub fn list(ui: &Ui, repo: &Repository) -> Result<Outcome> {
    let keys = {
        let _lock = repo.lock(false, "key list")?;
        repo.list_keys()?
    };
    for n in repo.take_notices() {
        ui.warn(n);
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                format!("{}{}", if k.current { "*" } else { " " }, &k.key_id[..8]),
                format!("{}@{}", k.username, k.hostname),
                k.created.format("%Y-%m-%d %H:%M:%S").to_string(),
                format!(
                    "argon2id m={} MiB t={} p={}",
                    k.kdf_memory_kib / 1024,
                    k.kdf_iterations,
                    k.kdf_parallelism
                ),
            ]
        })
        .collect();
    ui.table(&["ID", "USER", "CREATED", "KDF"], &rows);
    ui.summary(&json!({ "keys": keys }));
    Ok(Outcome::Ok)
}

pub fn add(ui: &Ui, repo: &Repository, new: &NewKey) -> Result<Outcome> {
    let name = {
        let _lock = repo.lock(false, "key add")?;
        repo.add_key(new)?
    };
    ui.info(format!("added key {}", name.short()));
    ui.summary(&json!({ "key_id": name.to_hex() }));
    Ok(Outcome::Ok)
}

pub fn remove(ui: &Ui, repo: &Repository, query: &str) -> Result<Outcome> {
    let name = {
        let _lock = repo.lock(true, "key remove")?;
        repo.remove_key(query)?
    };
    ui.info(format!("removed key {}", name.short()));
    ui.summary(&json!({ "key_id": name.to_hex() }));
    Ok(Outcome::Ok)
}

pub fn passwd(ui: &Ui, mut repo: Repository, new: &NewKey) -> Result<Outcome> {
    let lock = repo.lock(true, "key passwd")?;
    let (old, written) = repo.change_password(new)?;
    drop(lock);
    ui.info(format!(
        "password changed: key {} replaces key {}",
        written.short(),
        old.short()
    ));
    ui.summary(&json!({ "key_id": written.to_hex(), "removed_key_id": old.to_hex() }));
    Ok(Outcome::Ok)
}
