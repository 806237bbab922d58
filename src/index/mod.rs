//! The SQLite catalog: a derived, rebuildable cache of which pack holds each
//! block and of the snapshot objects' metadata. It is never the truth:
//! deleting it loses nothing (spec: format-spec/04-catalog.md).

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::format::pack::TrailerEntry;
use crate::format::snapshot::SnapshotMeta;
use crate::format::{BlockId, ObjectName, SnapshotId};

pub const SCHEMA_VERSION: &str = "2";

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("catalog '{path}': {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("catalog '{path}': {reason}; run 'cbtvault repair index'")]
    Inconsistent { path: String, reason: String },
    /// SQLite found the file damaged (SQLITE_CORRUPT, SQLITE_NOTADB, or a
    /// failed `quick_check`): the catalog is derived, so it is rebuilt.
    #[error("catalog '{path}' is damaged ({reason}); it is rebuilt from the packs by 'cbtvault repair index'")]
    Corrupt { path: String, reason: String },
    #[error("catalog '{path}': {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
}

impl IndexError {
    /// Whether the catalog file itself is damaged (spec:
    /// format-spec/04-catalog.md#corrupt).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, IndexError::Corrupt { .. })
    }
}

/// A SQLite error as an [`IndexError`]; the damaged-file classes become
/// [`IndexError::Corrupt`], whatever statement met them.
fn sqlite_error(path: &str, source: rusqlite::Error) -> IndexError {
    match &source {
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
            ) =>
        {
            IndexError::Corrupt {
                path: path.to_string(),
                reason: source.to_string(),
            }
        }
        _ => IndexError::Sqlite {
            path: path.to_string(),
            source,
        },
    }
}

/// Catalogs up to this size are checked with `PRAGMA quick_check` on every
/// open (a fraction of a second); larger ones are checked by
/// `repair index` and otherwise found damaged by the statement that meets
/// the damage.
pub const QUICK_CHECK_MAX_BYTES: u64 = 32 << 20;

/// Moves a damaged catalog (with its `-wal`) aside as
/// `catalog.corrupt-<time>` in the same folder, for diagnosis, and removes
/// its `-shm`. Every connection to it must be closed. Returns the new name.
/// spec: format-spec/04-catalog.md#corrupt
pub fn move_aside(path: &Path) -> Result<std::path::PathBuf, IndexError> {
    let shown = path.display().to_string();
    let dir = path.parent().unwrap_or(Path::new("."));
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = dir.join(format!("catalog.corrupt-{stamp}"));
    let io = |what: &'static str| {
        let path = shown.clone();
        move |source| IndexError::Io { path, what, source }
    };
    std::fs::rename(path, &aside).map_err(io("move the damaged catalog aside"))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut wal_aside = aside.clone().into_os_string();
    wal_aside.push("-wal");
    match std::fs::rename(&wal, &wal_aside) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("move the damaged catalog's -wal aside")(e))
        }
        _ => {}
    }
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    match std::fs::remove_file(&shm) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("remove the damaged catalog's -shm")(e))
        }
        _ => {}
    }
    Ok(aside)
}

/// SQLite page cache of a catalog connection, in KiB (64 MiB).
pub const CACHE_KIB: i64 = 64 << 10;

/// Where a block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLocation {
    pub pack: ObjectName,
    pub offset: u64,
    pub stored_length: u32,
    pub raw_length: u32,
}

pub struct Catalog {
    conn: Connection,
    path: String,
}

/// How the catalog was found when opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenState {
    /// Schema and repository id matched.
    Current,
    /// Missing, of another schema or repository: emptied; needs a rebuild.
    Reset,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs(pack_id INTEGER PRIMARY KEY, name BLOB NOT NULL UNIQUE, size_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blocks(block_id BLOB PRIMARY KEY, pack_id INTEGER NOT NULL, offset INTEGER NOT NULL, stored_length INTEGER NOT NULL, raw_length INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(object BLOB PRIMARY KEY, id TEXT NOT NULL, generation INTEGER NOT NULL, time TEXT NOT NULL, source TEXT NOT NULL, parent TEXT, meta TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_seen(name BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS snapshots_by_id ON snapshots(id);
CREATE TABLE IF NOT EXISTS damaged(block_id BLOB NOT NULL, pack_name BLOB NOT NULL, reason TEXT NOT NULL, time TEXT NOT NULL, PRIMARY KEY(block_id, pack_name)) WITHOUT ROWID;
";

/// A block row moves to a new copy only when its current copy is damaged
/// and the new one is not (spec: format-spec/04-catalog.md#damaged).
const INSERT_BLOCK: &str = "
INSERT INTO blocks(block_id, pack_id, offset, stored_length, raw_length) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT(block_id) DO UPDATE SET pack_id = excluded.pack_id, offset = excluded.offset,
    stored_length = excluded.stored_length, raw_length = excluded.raw_length
WHERE EXISTS (SELECT 1 FROM damaged d JOIN packs p ON p.name = d.pack_name
              WHERE d.block_id = blocks.block_id AND p.pack_id = blocks.pack_id)
  AND NOT EXISTS (SELECT 1 FROM damaged d WHERE d.block_id = excluded.block_id AND d.pack_name = ?6)";

/// Whether a block's catalog row names an intact copy.
const INTACT_BLOCK: &str = "
SELECT 1 FROM blocks b JOIN packs p ON p.pack_id = b.pack_id WHERE b.block_id = ?1
AND NOT EXISTS (SELECT 1 FROM damaged d WHERE d.block_id = b.block_id AND d.pack_name = p.name)";

/// A stored copy of a block found damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedCopy {
    pub block: BlockId,
    pub pack: ObjectName,
    pub reason: String,
    pub time: String,
    /// Whether the catalog's row for the block still names this copy (no
    /// intact copy is known).
    pub current: bool,
}

impl Catalog {
    /// Opens (creating if needed) the catalog for repository `repo_id`.
    /// A damaged file is [`IndexError::Corrupt`] (checked with
    /// `quick_check` when the file is small): the caller moves it aside
    /// under the lock and rebuilds (spec: format-spec/04-catalog.md#corrupt).
    pub fn open(path: &Path, repo_id: &str) -> Result<(Catalog, OpenState), IndexError> {
        let (cat, state) = Self::open_once(path, repo_id)?;
        let small = std::fs::metadata(path).is_ok_and(|m| m.len() <= QUICK_CHECK_MAX_BYTES);
        if small {
            cat.quick_check()?;
        }
        Ok((cat, state))
    }

    /// Another connection to a catalog this process has opened (and
    /// checked) with [`Catalog::open`]: no `quick_check` again.
    pub fn reopen(path: &Path, repo_id: &str) -> Result<Catalog, IndexError> {
        Ok(Self::open_once(path, repo_id)?.0)
    }

    /// Sets this connection's SQLite page cache to `kib` KiB (extra
    /// connections of one process keep theirs small; the OS page cache is
    /// shared anyway).
    pub fn set_cache_kib(&self, kib: i64) -> Result<(), IndexError> {
        self.conn
            .pragma_update(None, "cache_size", -kib)
            .map_err(|e| self.err(e))
    }

    /// A catalog of nothing, in memory: stands in while a damaged file's
    /// connection is closed and the file replaced.
    pub fn detached() -> Result<Catalog, IndexError> {
        let conn = Connection::open_in_memory().map_err(|e| sqlite_error(":memory:", e))?;
        Ok(Catalog {
            conn,
            path: ":memory:".into(),
        })
    }

    /// `PRAGMA quick_check`: [`IndexError::Corrupt`] unless SQLite finds
    /// the file sound. Reads every page: costs time in proportion to size.
    pub fn quick_check(&self) -> Result<(), IndexError> {
        let first: String = self
            .conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if first == "ok" {
            Ok(())
        } else {
            Err(IndexError::Corrupt {
                path: self.path.clone(),
                reason: format!("quick_check: {first}"),
            })
        }
    }

    fn open_once(path: &Path, repo_id: &str) -> Result<(Catalog, OpenState), IndexError> {
        let shown = path.display().to_string();
        let sql = |source| sqlite_error(&shown, source);
        // SQLite gives its -wal and -shm files the database file's mode:
        // created 0600 here, the whole catalog stays private.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            if let Err(e) = created {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(IndexError::Io {
                        path: shown.clone(),
                        what: "create",
                        source: e,
                    });
                }
            }
        }
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(sql)?;
        // Switching a new file to WAL needs a moment alone with it; SQLite
        // does not wait for that, so processes opening it together retry.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.map_err(sql)?,
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // Room for the interior pages of a catalog of ~100 million blocks
        // (about 1% of its 60 bytes per block), so a lookup reads one leaf
        // rather than a path from the root; bounded whatever the size.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(sql)?;
        let mut cat = Catalog { conn, path: shown };
        let state = cat.ensure_schema(repo_id)?;
        Ok((cat, state))
    }

    fn err(&self, source: rusqlite::Error) -> IndexError {
        sqlite_error(&self.path, source)
    }

    /// Checks the schema; resets the catalog when it is missing or of
    /// another version or repository. A reset happens inside a write
    /// transaction that re-reads the schema first, so processes opening a
    /// missing catalog together create it once (the first) and see it.
    fn ensure_schema(&mut self, repo_id: &str) -> Result<OpenState, IndexError> {
        if let Some(state) = self.schema_state(repo_id)? {
            return Ok(state);
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        let result = (|| {
            if let Some(state) = self.schema_state(repo_id)? {
                return Ok(state);
            }
            self.conn
                .execute_batch(
                    "DROP TABLE IF EXISTS meta; DROP TABLE IF EXISTS packs;
                     DROP TABLE IF EXISTS blocks; DROP TABLE IF EXISTS snapshots;
                     DROP TABLE IF EXISTS damaged;",
                )
                .and_then(|_| self.conn.execute_batch(SCHEMA))
                .and_then(|_| {
                    self.conn.execute(
                        "INSERT INTO meta(key, value) VALUES ('schema_version', ?1), ('repository_id', ?2)",
                        params![SCHEMA_VERSION, repo_id],
                    )
                })
                .map_err(|e| self.err(e))?;
            Ok(OpenState::Reset)
        })();
        match result {
            Ok(state) => {
                self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))?;
                Ok(state)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// The state of a catalog of this schema and repository; None when it
    /// must be reset.
    fn schema_state(&self, repo_id: &str) -> Result<Option<OpenState>, IndexError> {
        let has_meta: bool = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='meta'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| self.err(e))?
            > 0;
        let (version, id, complete) = if has_meta {
            let get = |k: &str| {
                self.conn
                    .query_row("SELECT value FROM meta WHERE key=?1", [k], |r| {
                        r.get::<_, String>(0)
                    })
                    .optional()
            };
            (
                get("schema_version").map_err(|e| self.err(e))?,
                get("repository_id").map_err(|e| self.err(e))?,
                get("complete").map_err(|e| self.err(e))?,
            )
        } else {
            (None, None, None)
        };
        if version.as_deref() == Some(SCHEMA_VERSION) && id.as_deref() == Some(repo_id) {
            // A rebuild that was interrupted left no 'complete' row.
            return Ok(Some(if complete.is_some() {
                OpenState::Current
            } else {
                OpenState::Reset
            }));
        }
        Ok(None)
    }

    /// Starts a rebuild: one write transaction (`BEGIN IMMEDIATE`, so
    /// concurrent rebuilders queue on it). Returns false, with the
    /// transaction closed, when `only_if_incomplete` and another process
    /// completed the catalog while this one waited. Otherwise empties packs,
    /// blocks and snapshots (never `damaged`) inside the transaction, which
    /// [`Catalog::finish_rebuild`] or [`Catalog::abort_rebuild`] closes.
    /// spec: format-spec/04-catalog.md#rebuild
    pub fn begin_rebuild(&mut self, only_if_incomplete: bool) -> Result<bool, IndexError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        let run = |conn: &Connection| -> rusqlite::Result<bool> {
            if only_if_incomplete {
                let complete = conn
                    .query_row("SELECT 1 FROM meta WHERE key='complete'", [], |_| Ok(()))
                    .optional()?
                    .is_some();
                if complete {
                    conn.execute_batch("COMMIT")?;
                    return Ok(false);
                }
            }
            conn.execute_batch(
                "DELETE FROM meta WHERE key='complete'; DELETE FROM blocks;
                 DELETE FROM packs; DELETE FROM snapshots; DELETE FROM index_seen;",
            )?;
            Ok(true)
        };
        match run(&self.conn) {
            Ok(b) => Ok(b),
            Err(e) => {
                self.abort_rebuild();
                Err(self.err(e))
            }
        }
    }

    /// Ends a rebuild: drops `damaged` rows of packs no longer present (the
    /// count is returned), marks the catalog complete and commits.
    pub fn finish_rebuild(&mut self) -> Result<u64, IndexError> {
        let run = |conn: &Connection| -> rusqlite::Result<u64> {
            let gone = conn.execute(
                "DELETE FROM damaged WHERE pack_name NOT IN (SELECT name FROM packs)",
                [],
            )?;
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('complete', '1')",
                [],
            )?;
            conn.execute_batch("COMMIT")?;
            Ok(gone as u64)
        };
        match run(&self.conn) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.abort_rebuild();
                Err(self.err(e))
            }
        }
    }

    /// Rolls an unfinished rebuild back (the old catalog stays).
    pub fn abort_rebuild(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// Index objects already read into this catalog
    /// (spec: format-spec/04-catalog.md#remote).
    pub fn index_seen(&self) -> Result<std::collections::HashSet<ObjectName>, IndexError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM index_seen")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(|e| self.err(e))?;
        let mut out = std::collections::HashSet::new();
        for r in rows {
            let bytes = r.map_err(|e| self.err(e))?;
            if let Ok(a) = <[u8; 32]>::try_from(bytes.as_slice()) {
                out.insert(ObjectName(a));
            }
        }
        Ok(out)
    }

    /// Records that index object `name` has been read into the catalog.
    pub fn mark_index_seen(&self, name: &ObjectName) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO index_seen(name) VALUES (?1)",
                [&name.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records that the catalog describes every durable pack.
    pub fn mark_complete(&mut self) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('complete', '1')",
                [],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records a durable pack and all its blocks in one transaction (a
    /// savepoint inside a rebuild's). A block already known keeps its
    /// location unless that copy is damaged and this one is not.
    pub fn add_pack(
        &mut self,
        name: &ObjectName,
        size_bytes: u64,
        entries: &[TrailerEntry],
    ) -> Result<(), IndexError> {
        let path = self.path.clone();
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.savepoint()?;
            tx.execute(
                "INSERT OR IGNORE INTO packs(name, size_bytes) VALUES (?1, ?2)",
                params![&name.0[..], size_bytes as i64],
            )?;
            let pack_id: i64 = tx.query_row(
                "SELECT pack_id FROM packs WHERE name=?1",
                [&name.0[..]],
                |r| r.get(0),
            )?;
            {
                let mut stmt = tx.prepare_cached(INSERT_BLOCK)?;
                for e in entries {
                    stmt.execute(params![
                        &e.block_id.0[..],
                        pack_id,
                        e.offset as i64,
                        e.stored_length,
                        e.raw_length,
                        &name.0[..]
                    ])?;
                }
            }
            tx.commit()
        };
        run(&mut self.conn).map_err(|source| sqlite_error(&path, source))
    }

    /// Forgets a pack and every block located in it. Its `damaged` rows
    /// stay until [`Catalog::forget_damage_of_pack`] (after the file is gone).
    pub fn remove_pack(&mut self, name: &ObjectName) -> Result<(), IndexError> {
        let path = self.path.clone();
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.savepoint()?;
            tx.execute(
                "DELETE FROM blocks WHERE pack_id IN (SELECT pack_id FROM packs WHERE name=?1)",
                [&name.0[..]],
            )?;
            tx.execute("DELETE FROM packs WHERE name=?1", [&name.0[..]])?;
            tx.commit()
        };
        run(&mut self.conn).map_err(|source| sqlite_error(&path, source))
    }

    /// Replaces pack `old` by `new` (its salvaged blocks; None when nothing
    /// was salvaged) in one transaction: the old pack's rows are deleted,
    /// the new pack's added. Its `damaged` rows stay until the file is gone
    /// (spec: format-spec/06-ordering.md#repair-packs).
    pub fn replace_pack(
        &mut self,
        old: &ObjectName,
        new: Option<(&ObjectName, u64, &[TrailerEntry])>,
    ) -> Result<(), IndexError> {
        self.conn
            .execute_batch("SAVEPOINT replace_pack")
            .map_err(|e| self.err(e))?;
        let result = self.remove_pack(old).and_then(|()| match new {
            Some((name, size, entries)) => self.add_pack(name, size, entries),
            None => Ok(()),
        });
        let end = if result.is_ok() {
            "RELEASE replace_pack"
        } else {
            "ROLLBACK TO replace_pack; RELEASE replace_pack"
        };
        self.conn.execute_batch(end).map_err(|e| self.err(e))?;
        result
    }

    fn row_to_location(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<BlockLocation> {
        let name: Vec<u8> = row.get(0)?;
        let name: [u8; 32] = name.try_into().map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Blob,
                "pack name is not 32 bytes".into(),
            )
        })?;
        Ok(BlockLocation {
            pack: ObjectName(name),
            offset: row.get::<_, i64>(1)? as u64,
            stored_length: row.get(2)?,
            raw_length: row.get(3)?,
        })
    }

    /// Looks up many blocks at once (one read transaction).
    pub fn lookup_many(&self, ids: &[BlockId]) -> Result<Vec<Option<BlockLocation>>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.name, b.offset, b.stored_length, b.raw_length
                 FROM blocks b JOIN packs p ON p.pack_id = b.pack_id WHERE b.block_id = ?1",
            )
            .map_err(|e| self.err(e))?;
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(
                stmt.query_row([&id.0[..]], |r| self.row_to_location(r))
                    .optional()
                    .map_err(|e| self.err(e))?,
            );
        }
        drop(stmt);
        tx.finish().map_err(|e| self.err(e))?;
        Ok(out)
    }

    pub fn lookup(&self, id: &BlockId) -> Result<Option<BlockLocation>, IndexError> {
        Ok(self.lookup_many(std::slice::from_ref(id))?.pop().flatten())
    }

    /// Whether each block has a row naming an intact copy: what
    /// deduplication may rely on (spec: format-spec/04-catalog.md#damaged).
    pub fn contains_intact_many(&self, ids: &[BlockId]) -> Result<Vec<bool>, IndexError> {
        self.exists_many(INTACT_BLOCK, ids)
    }

    /// For each id, whether `sql` (one `?1` parameter: the block id) finds a
    /// row; one prepared statement, one read transaction for the batch.
    fn exists_many(&self, sql: &str, ids: &[BlockId]) -> Result<Vec<bool>, IndexError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(stmt.exists([&id.0[..]]).map_err(|e| self.err(e))?);
        }
        drop(stmt);
        tx.finish().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Records that the copy of `block` in `pack` failed verification.
    /// Idempotent; the first reason is kept.
    pub fn mark_damaged(
        &self,
        block: &BlockId,
        pack: &ObjectName,
        reason: &str,
    ) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO damaged(block_id, pack_name, reason, time) VALUES (?1, ?2, ?3, ?4)",
                params![&block.0[..], &pack.0[..], reason, chrono::Utc::now().to_rfc3339()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every damaged copy recorded.
    pub fn damaged(&self) -> Result<Vec<DamagedCopy>, IndexError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.block_id, d.pack_name, d.reason, d.time,
                        EXISTS (SELECT 1 FROM blocks b JOIN packs p ON p.pack_id = b.pack_id
                                WHERE b.block_id = d.block_id AND p.name = d.pack_name)
                 FROM damaged d ORDER BY d.pack_name, d.block_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (block, pack, reason, time, current) = row.map_err(|e| self.err(e))?;
            let bad = || IndexError::Inconsistent {
                path: self.path.clone(),
                reason: "a damaged row is not 32-byte ids".into(),
            };
            out.push(DamagedCopy {
                block: BlockId(block.try_into().map_err(|_| bad())?),
                pack: ObjectName(pack.try_into().map_err(|_| bad())?),
                reason,
                time,
                current,
            });
        }
        Ok(out)
    }

    /// Deletes the `damaged` row of one copy that verified again after a
    /// whole-pack read (spec: format-spec/04-catalog.md#damaged).
    pub fn clear_damaged(&self, block: &BlockId, pack: &ObjectName) -> Result<(), IndexError> {
        self.conn
            .execute(
                "DELETE FROM damaged WHERE block_id = ?1 AND pack_name = ?2",
                [&block.0[..], &pack.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes the `damaged` rows of a pack whose file has been removed.
    pub fn forget_damage_of_pack(&self, pack: &ObjectName) -> Result<(), IndexError> {
        self.conn
            .execute("DELETE FROM damaged WHERE pack_name = ?1", [&pack.0[..]])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Starts prune's mark: an empty TEMP table `used` of every block some
    /// snapshot object names (on disk in SQLite's temp store, not in RAM;
    /// spec: format-spec/06-ordering.md#prune).
    pub fn begin_mark(&self) -> Result<(), IndexError> {
        self.conn
            .execute_batch(
                "DROP TABLE IF EXISTS temp.used;
                 CREATE TEMP TABLE used(block_id BLOB PRIMARY KEY) WITHOUT ROWID;",
            )
            .map_err(|e| self.err(e))
    }

    /// Adds blocks to the mark (one transaction for the batch).
    pub fn mark_used<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a BlockId>,
    ) -> Result<(), IndexError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO temp.used(block_id) VALUES (?1)")
                .map_err(|e| self.err(e))?;
            for id in ids {
                stmt.execute([&id.0[..]]).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// For each blob of `pack`, whether prune must keep this copy: its
    /// block is marked and no intact copy in another pack is what the
    /// catalog locates (a duplicate whose catalog row names an intact copy
    /// elsewhere is garbage).
    pub fn needed_in_pack(
        &self,
        pack: &ObjectName,
        ids: &[BlockId],
    ) -> Result<Vec<bool>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM temp.used u WHERE u.block_id = ?1)
                    AND NOT EXISTS (SELECT 1 FROM blocks b JOIN packs p ON p.pack_id = b.pack_id
                        WHERE b.block_id = ?1 AND p.name != ?2
                        AND NOT EXISTS (SELECT 1 FROM damaged d
                                        WHERE d.block_id = b.block_id AND d.pack_name = p.name))",
            )
            .map_err(|e| self.err(e))?;
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(
                stmt.query_row(params![&id.0[..], &pack.0[..]], |r| r.get::<_, bool>(0))
                    .map_err(|e| self.err(e))?,
            );
        }
        drop(stmt);
        tx.finish().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// For each of `ids`, whether prune's mark holds it (a snapshot object
    /// references the block).
    pub fn marked(&self, ids: &[BlockId]) -> Result<Vec<bool>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM temp.used WHERE block_id = ?1)")
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(
                stmt.query_row([&id.0[..]], |r| r.get::<_, bool>(0))
                    .map_err(|e| self.err(e))?,
            );
        }
        Ok(out)
    }

    /// Ends prune's mark (drops the TEMP table).
    pub fn end_mark(&self) -> Result<(), IndexError> {
        self.conn
            .execute_batch("DROP TABLE IF EXISTS temp.used")
            .map_err(|e| self.err(e))
    }

    /// Whether the catalog has rows for pack `name`.
    pub fn has_pack(&self, name: &ObjectName) -> Result<bool, IndexError> {
        self.conn
            .prepare_cached("SELECT 1 FROM packs WHERE name = ?1")
            .and_then(|mut s| s.exists([&name.0[..]]))
            .map_err(|e| self.err(e))
    }

    /// Runs `f` in one transaction (a savepoint): all of its changes are
    /// committed together, or none when it fails.
    pub fn batch<T, E: From<IndexError>>(
        &mut self,
        f: impl FnOnce(&mut Catalog) -> Result<T, E>,
    ) -> Result<T, E> {
        self.conn
            .execute_batch("SAVEPOINT batch")
            .map_err(|e| self.err(e))?;
        let result = f(self);
        let end = if result.is_ok() {
            "RELEASE batch"
        } else {
            "ROLLBACK TO batch; RELEASE batch"
        };
        self.conn.execute_batch(end).map_err(|e| self.err(e))?;
        result
    }

    /// Whether each block is known (cheaper than a full lookup).
    pub fn contains_many(&self, ids: &[BlockId]) -> Result<Vec<bool>, IndexError> {
        self.exists_many("SELECT 1 FROM blocks WHERE block_id = ?1", ids)
    }

    /// Every pack the catalog knows, with its size and block count.
    pub fn packs(&self) -> Result<Vec<(ObjectName, u64, u64)>, IndexError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.name, p.size_bytes, (SELECT count(*) FROM blocks b WHERE b.pack_id = p.pack_id)
                 FROM packs p",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let name: Vec<u8> = r.get(0)?;
                Ok((name, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, size, count) = row.map_err(|e| self.err(e))?;
            let name: [u8; 32] = name.try_into().map_err(|_| IndexError::Inconsistent {
                path: self.path.clone(),
                reason: "a pack name is not 32 bytes".into(),
            })?;
            out.push((ObjectName(name), size, count));
        }
        Ok(out)
    }

    /// Blocks located in one pack.
    pub fn blocks_in_pack(
        &self,
        pack: &ObjectName,
    ) -> Result<Vec<(BlockId, BlockLocation)>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.name, b.offset, b.stored_length, b.raw_length, b.block_id
                 FROM blocks b JOIN packs p ON p.pack_id = b.pack_id WHERE p.name = ?1
                 ORDER BY b.offset",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([&pack.0[..]], |r| {
                let loc = self.row_to_location(r)?;
                let id: Vec<u8> = r.get(4)?;
                Ok((id, loc))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, loc) = row.map_err(|e| self.err(e))?;
            let id: [u8; 32] = id.try_into().map_err(|_| IndexError::Inconsistent {
                path: self.path.clone(),
                reason: "a block id is not 32 bytes".into(),
            })?;
            out.push((BlockId(id), loc));
        }
        Ok(out)
    }

    /// (number of blocks, sum of raw lengths, sum of stored lengths).
    pub fn block_totals(&self) -> Result<(u64, u64, u64), IndexError> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(raw_length),0), coalesce(sum(stored_length),0) FROM blocks",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, i64>(2)? as u64,
                    ))
                },
            )
            .map_err(|e| self.err(e))
    }

    pub fn upsert_snapshot(
        &mut self,
        object: &ObjectName,
        meta: &SnapshotMeta,
    ) -> Result<(), IndexError> {
        let json = serde_json::to_string(meta).expect("meta serializes");
        self.conn
            .execute(
                "INSERT OR REPLACE INTO snapshots(object, id, generation, time, source, parent, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    &object.0[..],
                    meta.id.to_hex(),
                    meta.generation,
                    meta.time.to_rfc3339(),
                    meta.source,
                    meta.parent.map(|p| p.to_hex()),
                    json
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn remove_snapshot(&mut self, object: &ObjectName) -> Result<(), IndexError> {
        self.conn
            .execute("DELETE FROM snapshots WHERE object=?1", [&object.0[..]])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every snapshot object recorded, with its metadata.
    pub fn snapshots(&self) -> Result<Vec<(ObjectName, SnapshotMeta)>, IndexError> {
        self.snapshot_rows("SELECT object, meta FROM snapshots", [])
    }

    /// The objects of snapshot `id` (every generation), with their
    /// metadata: one index lookup, whatever the number of snapshots.
    pub fn snapshots_with_id(
        &self,
        id: SnapshotId,
    ) -> Result<Vec<(ObjectName, SnapshotMeta)>, IndexError> {
        self.snapshot_rows(
            "SELECT object, meta FROM snapshots WHERE id = ?1",
            [id.to_hex()],
        )
    }

    fn snapshot_rows<P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
    ) -> Result<Vec<(ObjectName, SnapshotMeta)>, IndexError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (object, meta) = row.map_err(|e| self.err(e))?;
            let bad = |reason: &str| IndexError::Inconsistent {
                path: self.path.clone(),
                reason: reason.to_string(),
            };
            let object: [u8; 32] = object
                .try_into()
                .map_err(|_| bad("object name not 32 bytes"))?;
            let meta: SnapshotMeta =
                serde_json::from_str(&meta).map_err(|_| bad("snapshot metadata unreadable"))?;
            out.push((ObjectName(object), meta));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(block: u8, offset: u64) -> TrailerEntry {
        TrailerEntry {
            block_id: BlockId([block; 32]),
            offset,
            stored_length: 10,
            raw_length: 20,
        }
    }

    fn catalog(dir: &tempfile::TempDir) -> Catalog {
        Catalog::open(&dir.path().join("c.sqlite"), "repo")
            .unwrap()
            .0
    }

    const P1: ObjectName = ObjectName([1; 32]);
    const P2: ObjectName = ObjectName([2; 32]);
    const P3: ObjectName = ObjectName([3; 32]);

    #[test]
    fn a_damaged_copy_is_replaced_by_an_intact_one_and_never_the_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = catalog(&dir);
        let x = BlockId([9; 32]);
        c.add_pack(&P1, 100, &[entry(9, 8)]).unwrap();
        assert_eq!(c.contains_intact_many(&[x]).unwrap(), vec![true]);
        c.mark_damaged(&x, &P1, "flipped").unwrap();
        assert_eq!(c.contains_intact_many(&[x]).unwrap(), vec![false]);
        // Still located (readers fail loudly on it), but not for dedup.
        assert_eq!(c.lookup(&x).unwrap().unwrap().pack, P1);
        // A pack whose copy is damaged too does not take the row.
        c.mark_damaged(&x, &P2, "also bad").unwrap();
        c.add_pack(&P2, 100, &[entry(9, 8)]).unwrap();
        assert_eq!(c.lookup(&x).unwrap().unwrap().pack, P1);
        // An intact copy does, and keeps it.
        c.add_pack(&P3, 100, &[entry(9, 40)]).unwrap();
        assert_eq!(c.lookup(&x).unwrap().unwrap().pack, P3);
        assert_eq!(c.contains_intact_many(&[x]).unwrap(), vec![true]);
        c.add_pack(&P1, 100, &[entry(9, 8)]).unwrap();
        assert_eq!(c.lookup(&x).unwrap().unwrap().pack, P3);
        let damaged = c.damaged().unwrap();
        assert_eq!(damaged.len(), 2);
        assert!(damaged.iter().all(|d| !d.current));
    }

    #[test]
    fn a_rebuild_keeps_damage_of_present_packs_and_drops_that_of_gone_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = catalog(&dir);
        let x = BlockId([9; 32]);
        c.add_pack(&P1, 100, &[entry(9, 8)]).unwrap();
        c.mark_damaged(&x, &P1, "flipped").unwrap();
        c.mark_damaged(&x, &P2, "pack since removed").unwrap();
        assert!(c.begin_rebuild(false).unwrap());
        c.add_pack(&P1, 100, &[entry(9, 8)]).unwrap();
        assert_eq!(c.finish_rebuild().unwrap(), 1);
        let damaged = c.damaged().unwrap();
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].pack, P1);
        assert!(damaged[0].current);
        assert_eq!(c.contains_intact_many(&[x]).unwrap(), vec![false]);
        // A rebuild that only runs when incomplete does nothing now.
        assert!(!c.begin_rebuild(true).unwrap());
        assert!(c.conn.is_autocommit());
    }

    /// A catalog too large for `quick_check` on open: the statement that
    /// meets a damaged page reports the damage as such (with the hint).
    #[test]
    fn a_statement_meeting_a_garbage_page_reports_the_catalog_corrupt() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        {
            let mut c = catalog(&dir);
            let entries: Vec<TrailerEntry> = (0..2000u32)
                .map(|i| TrailerEntry {
                    block_id: BlockId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
                    offset: i as u64,
                    stored_length: 10,
                    raw_length: 20,
                })
                .collect();
            c.add_pack(&P1, 100, &entries).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for page in 2..len / 4096 - 1 {
            f.write_all_at(&[0xA5; 4096], page * 4096).unwrap();
        }
        drop(f);
        let err = match Catalog::open_once(&path, "repo") {
            Ok((c, _)) => c.block_totals().unwrap_err(),
            Err(e) => e,
        };
        assert!(err.is_corrupt(), "{err:?}");
        assert!(err.to_string().contains("repair index"), "{err}");
        let aside = move_aside(&path).unwrap();
        assert!(aside.exists() && !path.exists());
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("catalog.corrupt-"));
    }

    #[test]
    fn an_aborted_rebuild_leaves_the_old_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = catalog(&dir);
        c.add_pack(&P1, 100, &[entry(9, 8)]).unwrap();
        c.mark_complete().unwrap();
        assert!(c.begin_rebuild(false).unwrap());
        assert!(c.packs().unwrap().is_empty());
        c.abort_rebuild();
        assert_eq!(c.packs().unwrap().len(), 1);
        assert!(!c.begin_rebuild(true).unwrap(), "still complete");
    }
}
