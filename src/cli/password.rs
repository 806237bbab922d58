//! Repository passwords at the command edge: from a file, the environment
//! or a prompt on the terminal, never from argv; asked only when a
//! repository turns out to be encrypted.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::repo::PasswordSource;

/// The first line of `path`, without its line ending.
fn first_line(path: &Path) -> Result<Zeroizing<String>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("read the password file '{}': {e}", path.display()))?,
    );
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!("the password file '{}' is empty", path.display()));
    }
    Ok(Zeroizing::new(line.to_string()))
}

fn from_env(var: &str) -> Option<Zeroizing<String>> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Zeroizing::new)
}

fn prompt(text: &str) -> Result<Zeroizing<String>, String> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .map_err(|e| format!("read the password from the terminal: {e}"))
}

/// The password of an existing repository: `file` (from
/// `--password-file` / `CBTVAULT_PASSWORD_FILE`), else
/// `CBTVAULT_PASSWORD`, else a prompt when stdin is a terminal.
pub fn existing(file: Option<PathBuf>, what: String) -> PasswordSource {
    PasswordSource::new(move || {
        if let Some(f) = &file {
            return first_line(f);
        }
        if let Some(p) = from_env("CBTVAULT_PASSWORD") {
            return Ok(p);
        }
        if std::io::stdin().is_terminal() {
            return prompt(&format!("password for {what}: "));
        }
        Err(format!(
            "{what} is encrypted and no password was given: use --password-file FILE, CBTVAULT_PASSWORD_FILE or CBTVAULT_PASSWORD"
        ))
    })
}

/// A new password: `file`, else the variable `env`, else typed twice at a
/// terminal.
pub fn new(file: Option<PathBuf>, env: &'static str, what: String) -> PasswordSource {
    PasswordSource::new(move || {
        if let Some(f) = &file {
            return first_line(f);
        }
        if let Some(p) = from_env(env) {
            return Ok(p);
        }
        if std::io::stdin().is_terminal() {
            let a = prompt(&format!("new password for {what}: "))?;
            let b = prompt("the same again: ")?;
            if a != b {
                return Err("the two passwords differ".into());
            }
            return Ok(a);
        }
        Err(format!(
            "no new password for {what}: use a password file or {env}"
        ))
    })
}
