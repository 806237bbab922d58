//! Key objects of encrypted repositories: finding the one a password opens,
//! writing new ones, listing and removing them
//! (spec: format-spec/09-encryption.md#key-object).

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use zeroize::Zeroizing;

use super::{RepoError, Repository};
use crate::backend::{Backend, Kind};
use crate::crypto::password;
use crate::crypto::MasterSecret;
use crate::format::key::{self, KdfParams, KeyObject};
use crate::format::ObjectName;

/// Where a password comes from, asked only when a repository turns out
/// to be encrypted.
#[derive(Clone)]
pub struct PasswordSource(Arc<dyn Fn() -> Result<Zeroizing<String>, String> + Send + Sync>);

impl std::fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordSource(..)")
    }
}

impl PasswordSource {
    pub fn new(f: impl Fn() -> Result<Zeroizing<String>, String> + Send + Sync + 'static) -> Self {
        PasswordSource(Arc::new(f))
    }

    /// A password known in advance (library callers, tests).
    pub fn fixed(password: &str) -> Self {
        let p = Zeroizing::new(password.to_string());
        PasswordSource::new(move || Ok(p.clone()))
    }

    pub fn get(&self) -> Result<Zeroizing<String>, String> {
        (self.0)()
    }
}

/// A password for a new key object, with its Argon2id parameters.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub password: PasswordSource,
    pub kdf: KdfParams,
}

/// The key an encrypted repository was opened with.
#[derive(Clone)]
pub(crate) struct Unlocked {
    pub(crate) master: MasterSecret,
    pub(crate) key_name: ObjectName,
}

/// One key object, as `key list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    /// The key this process opened the repository with.
    pub current: bool,
    pub created: chrono::DateTime<Utc>,
    pub hostname: String,
    pub username: String,
    pub kdf_memory_kib: u32,
    pub kdf_iterations: u32,
    pub kdf_parallelism: u32,
}

fn repo_id_bytes(id: &str) -> Result<[u8; 32], RepoError> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(id, &mut b)
        .map_err(|_| RepoError::Invalid(format!("repository id '{id}' is not 64 hex digits")))?;
    Ok(b)
}

fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| format!("uid {}", m.uid()))
                .unwrap_or_else(|_| "unknown".into())
        })
}

/// Writes a key object wrapping `master` for `new`'s password; returns its
/// name. The object is decoded and opened again before it is written
/// (verify before write).
pub(crate) fn write_key(
    backend: &dyn Backend,
    repo_id: &str,
    master: &MasterSecret,
    new: &NewKey,
) -> Result<ObjectName, RepoError> {
    let id = repo_id_bytes(repo_id)?;
    let pw = new.password.get().map_err(RepoError::PasswordUnavailable)?;
    if pw.is_empty() {
        return Err(RepoError::Invalid("an empty password is refused".into()));
    }
    let salt: [u8; 32] = rand::random();
    let wrapped = password::wrap_with(
        master,
        pw.as_bytes(),
        &salt,
        &new.kdf,
        &id,
        crate::crypto::fresh_nonce(),
    )
    .map_err(|e| RepoError::Invalid(e.to_string()))?;
    let object = KeyObject {
        created: Utc::now(),
        hostname: super::lock::hostname(),
        username: username(),
        kdf: new.kdf,
        salt,
        master: wrapped,
    };
    let bytes = key::encode(&object);
    let back = key::decode(&bytes).map_err(|e| RepoError::Invalid(e.to_string()))?;
    match password::unwrap(&back, pw.as_bytes(), &id) {
        Ok(Some(m)) if m.0 == master.0 => {}
        _ => {
            return Err(RepoError::Invalid(
                "the new key object does not open with its password (verify before write)".into(),
            ))
        }
    }
    let name = ObjectName::of(&bytes);
    backend.save(Kind::Key, &name.to_hex(), &bytes)?;
    Ok(name)
}

/// A key object's name and content, or why it cannot be read.
type LoadedKey = (ObjectName, Result<KeyObject, String>);

/// The key objects, in name order: each decoded, or why it cannot be.
fn load_keys(backend: &dyn Backend) -> Result<Vec<LoadedKey>, RepoError> {
    let mut names: Vec<String> = backend
        .list(Kind::Key)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let Ok(object) = name.parse::<ObjectName>() else {
            continue; // not a key object's name: ignored, as in every folder
        };
        let bytes = match backend.load(Kind::Key, &name) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let decoded = if ObjectName::of(&bytes) != object {
            Err("content does not match its name".to_string())
        } else {
            key::decode(&bytes).map_err(|e| e.to_string())
        };
        out.push((object, decoded));
    }
    Ok(out)
}

/// The key object `password` opens, and the master secret. Nothing is
/// written either way.
pub(crate) fn find_key(
    backend: &dyn Backend,
    repo_id: &str,
    location: &str,
    password: &PasswordSource,
) -> Result<Unlocked, RepoError> {
    let id = repo_id_bytes(repo_id)?;
    let keys = load_keys(backend)?;
    if keys.is_empty() {
        return Err(RepoError::CorruptObject {
            kind: Kind::Key,
            name: "keys/".into(),
            reason: "the repository is encrypted but holds no key object".into(),
        });
    }
    let pw = password.get().map_err(RepoError::PasswordUnavailable)?;
    for (name, object) in &keys {
        let Ok(object) = object else { continue };
        match password::unwrap(object, pw.as_bytes(), &id) {
            Ok(Some(master)) => {
                return Ok(Unlocked {
                    master,
                    key_name: *name,
                })
            }
            Ok(None) => continue,
            Err(e) => {
                return Err(RepoError::CorruptObject {
                    kind: Kind::Key,
                    name: name.to_hex(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Err(RepoError::WrongPassword {
        location: location.to_string(),
    })
}

impl Repository {
    fn unlocked(&self, what: &str) -> Result<&Unlocked, RepoError> {
        self.unlocked.as_ref().ok_or_else(|| {
            RepoError::Invalid(format!(
                "{what}: '{}' is not encrypted, it has no keys",
                self.location()
            ))
        })
    }

    /// Every key object; unreadable ones are skipped with a notice.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, RepoError> {
        let current = self.unlocked("key list")?.key_name;
        let mut out = Vec::new();
        for (name, object) in load_keys(self.backend.as_ref())? {
            match object {
                Ok(k) => out.push(KeyInfo {
                    key_id: name.to_hex(),
                    current: name == current,
                    created: k.created,
                    hostname: k.hostname,
                    username: k.username,
                    kdf_memory_kib: k.kdf.memory_kib,
                    kdf_iterations: k.kdf.iterations,
                    kdf_parallelism: k.kdf.parallelism,
                }),
                Err(e) => self.notice(format!("key object {}: {e}", name.to_hex())),
            }
        }
        Ok(out)
    }

    /// Adds a key for another password; its name. The caller holds a lock.
    pub fn add_key(&self, new: &NewKey) -> Result<ObjectName, RepoError> {
        let u = self.unlocked("key add")?;
        self.ensure_lock_held()?;
        write_key(self.backend.as_ref(), &self.config.id, &u.master, new)
    }

    /// Removes key `query` (a name or unique prefix). Refused for the key
    /// this process opened with and for the last key. The caller holds the
    /// exclusive lock.
    pub fn remove_key(&self, query: &str) -> Result<ObjectName, RepoError> {
        let u = self.unlocked("key remove")?;
        self.ensure_exclusive_lock("key remove")?;
        let names: Vec<ObjectName> = load_keys(self.backend.as_ref())?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let q = query.to_ascii_lowercase();
        let matching: Vec<&ObjectName> = names
            .iter()
            .filter(|n| n.to_hex().starts_with(&q))
            .collect();
        let name = match matching.as_slice() {
            [] => {
                return Err(RepoError::Invalid(format!(
                    "no key matches '{query}' ('cbtvault key list' shows them)"
                )))
            }
            [one] => **one,
            _ => {
                return Err(RepoError::Invalid(format!(
                    "'{query}' matches {} keys; give more digits",
                    matching.len()
                )))
            }
        };
        if name == u.key_name {
            return Err(RepoError::Invalid(format!(
                "key {} is the one this command opened the repository with; open with another key to remove it, or use 'cbtvault key passwd'",
                name.short()
            )));
        }
        if names.len() < 2 {
            return Err(RepoError::Invalid(
                "the last key of a repository cannot be removed".into(),
            ));
        }
        self.backend.remove(Kind::Key, &name.to_hex())?;
        Ok(name)
    }

    /// Changes the password of the key this process opened with: the new
    /// key object is written (durable) before the old one is removed. The
    /// caller holds the exclusive lock. Returns (old, new) names.
    pub fn change_password(&mut self, new: &NewKey) -> Result<(ObjectName, ObjectName), RepoError> {
        self.ensure_exclusive_lock("key passwd")?;
        let u = self.unlocked("key passwd")?.clone();
        let written = write_key(self.backend.as_ref(), &self.config.id, &u.master, new)?;
        #[cfg(debug_assertions)]
        super::test_kill("key_passwd_new_written");
        self.backend.remove(Kind::Key, &u.key_name.to_hex())?;
        if let Some(current) = self.unlocked.as_mut() {
            current.key_name = written;
        }
        Ok((u.key_name, written))
    }
}
