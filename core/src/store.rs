//! The room store: room configurations in an embedded SQLite database (`rooms.db` in the
//! data folder), one row per room holding the room's JSON.
//!
//! Why SQLite rather than the JSON file Tessera used before (rewritten whole on every
//! change, under a lock that also stopped readers):
//! - a create is one INSERT of one row, so it costs the same with ten rooms or a hundred
//!   thousand, where rewriting the file grew with every room;
//! - in WAL mode a reader sees the last committed state without waiting for a write in
//!   progress, so a participant joining a room never stalls behind a management-API call;
//! - a commit is atomic and synced before the call returns, so a crash (kill -9, or power
//!   loss with `synchronous = FULL`) keeps every acknowledged change and never leaves a
//!   torn file.
//!
//! `sqlite3 rooms.db "SELECT room FROM rooms"` shows the rooms as JSON, and
//! `sqlite3 rooms.db ".backup copy.db"` backs them up while the server runs.
//!
//! A `rooms.json` left by an older Tessera beside the database is imported at the first
//! open and renamed to `rooms.json.migrated`. Live state (participants, streams) is not
//! stored here.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::room::Room;

/// The file an older Tessera kept its rooms in, looked for beside the database.
const LEGACY_FILE: &str = "rooms.json";
/// What the legacy file is renamed to once imported, so it is kept but not imported twice.
const MIGRATED_FILE: &str = "rooms.json.migrated";
/// Bumped whenever the schema changes, so an older binary refuses a newer database.
const SCHEMA_VERSION: i64 = 1;
/// Idle read connections kept for reuse; more are opened under load and closed after.
const MAX_IDLE_READERS: usize = 8;
/// How long a statement waits for another process's lock (a second server, or a
/// `sqlite3` shell) before failing, instead of failing at once.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

// `seq` keeps creation order for `list`: rowids of a table whose key is not an INTEGER
// PRIMARY KEY may be renumbered by VACUUM. The room's name is both in the JSON and in its
// own column so that SQLite enforces its uniqueness.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS rooms (
        id   TEXT PRIMARY KEY NOT NULL,
        seq  INTEGER NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        room TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    );
";

const INSERT_ROOM: &str = "INSERT INTO rooms (id, seq, name, room) VALUES (?1, (SELECT IFNULL(MAX(seq), 0) + 1 FROM rooms), ?2, ?3)";

/// Errors of the room store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No room with this id.
    #[error("Room not found: {0}")]
    NotFound(String),
    /// Another room already has this name or id.
    #[error("{0}")]
    Conflict(String),
    /// A file could not be read or renamed.
    #[error("room store {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database, or the legacy `rooms.json` being imported, holds something invalid.
    #[error("room store {path} is not valid: {reason}")]
    Corrupt {
        /// The database or legacy file.
        path: PathBuf,
        /// What failed to parse or validate.
        reason: String,
    },
    /// SQLite failed to open, read or write the database.
    #[error("room store {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The shared store (the cluster's) cannot be reached; nothing was changed.
    #[error("room store unavailable: {0}")]
    Unavailable(String),
    /// The database cannot be used as the store needs it (no WAL, or a newer schema).
    #[error("room store {path} cannot be used: {reason}")]
    Unusable {
        /// The database file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
}

/// Where room configurations live: this node's SQLite database ([`RoomStore`]), or in a
/// cluster a bucket shared by every node (`tessera-cluster`). Reads answer from what the
/// node holds, so joining a room never waits on another machine; writes may.
#[async_trait::async_trait]
pub trait Rooms: Send + Sync {
    /// The room with this id.
    fn get(&self, id: &str) -> Option<Room>;
    /// At most `limit` rooms in creation order, after skipping the first `offset`.
    fn list_page(&self, offset: usize, limit: usize) -> Result<Vec<Room>, StoreError>;
    /// How many rooms there are.
    fn count(&self) -> Result<usize, StoreError>;
    /// Adds a validated room; its id and name must be new.
    async fn create(&self, room: Room) -> Result<Room, StoreError>;
    /// Replaces a room's configuration (same id); the name must stay unique.
    async fn update(&self, room: Room) -> Result<Room, StoreError>;
    /// Removes a room and returns it.
    async fn delete(&self, id: &str) -> Result<Room, StoreError>;

    /// All rooms, in creation order; a failing store is logged and reads as no rooms.
    fn list(&self) -> Vec<Room> {
        self.list_page(0, usize::MAX).unwrap_or_else(|e| {
            tracing::error!(error = ?e.to_string(), "listing rooms");
            Vec::new()
        })
    }
}

#[async_trait::async_trait]
impl Rooms for RoomStore {
    fn get(&self, id: &str) -> Option<Room> {
        RoomStore::get(self, id)
    }
    fn list_page(&self, offset: usize, limit: usize) -> Result<Vec<Room>, StoreError> {
        RoomStore::list_page(self, offset, limit)
    }
    fn count(&self) -> Result<usize, StoreError> {
        RoomStore::count(self)
    }
    async fn create(&self, room: Room) -> Result<Room, StoreError> {
        RoomStore::create(self, room)
    }
    async fn update(&self, room: Room) -> Result<Room, StoreError> {
        RoomStore::update(self, room)
    }
    async fn delete(&self, id: &str) -> Result<Room, StoreError> {
        RoomStore::delete(self, id)
    }
}

/// Rooms in a SQLite database: one writer connection, and a pool of readers that WAL
/// lets proceed while a write is in progress.
#[derive(Debug)]
pub struct RoomStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl RoomStore {
    /// Opens (or creates) the database at `path`, importing a legacy `rooms.json` found
    /// beside it when the database has no rooms yet.
    pub fn open(path: impl Into<PathBuf>) -> Result<RoomStore, StoreError> {
        let path = path.into();
        let writer = open_writer(&path)?;
        let store = RoomStore { path, writer: Mutex::new(writer), readers: Mutex::new(Vec::new()) };
        store.import_legacy_json()?;
        Ok(store)
    }

    /// The database file this store persists to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// At most `limit` rooms in creation order, after skipping the first `offset`.
    pub fn list_page(&self, offset: usize, limit: usize) -> Result<Vec<Room>, StoreError> {
        let (offset, limit) = (to_sql_count(offset), to_sql_count(limit));
        let rows = self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT room FROM rooms ORDER BY seq LIMIT ?1 OFFSET ?2")?;
            let rows = stmt.query_map(params![limit, offset], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<Vec<String>>>()
        })?;
        rows.iter().map(|json| self.decode(json)).collect()
    }

    /// How many rooms there are.
    pub fn count(&self) -> Result<usize, StoreError> {
        let n = self.read(|c| c.prepare_cached("SELECT COUNT(*) FROM rooms")?.query_row([], |r| r.get::<_, i64>(0)))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The room with this id; a failing database is logged and reads as no room.
    pub fn get(&self, id: &str) -> Option<Room> {
        let found = self
            .read(|c| c.prepare_cached("SELECT room FROM rooms WHERE id = ?1")?.query_row(params![id], |r| r.get::<_, String>(0)).optional())
            .and_then(|json| json.map(|j| self.decode(&j)).transpose());
        found.unwrap_or_else(|e| {
            tracing::error!(room = ?id, error = ?e.to_string(), "reading a room");
            None
        })
    }

    /// Adds a validated room; its id and name must be new.
    pub fn create(&self, room: Room) -> Result<Room, StoreError> {
        let json = self.encode(&room)?;
        let conn = self.writer();
        let inserted = conn.prepare_cached(INSERT_ROOM).and_then(|mut s| s.execute(params![room.id, room.name, json]));
        match inserted {
            Ok(_) => Ok(room),
            Err(e) if is_unique_violation(&e) => Err(self.conflict(&conn, &room, e)),
            Err(e) => Err(self.db_error(e)),
        }
    }

    /// Replaces a room's configuration (same id); the name must stay unique.
    pub fn update(&self, room: Room) -> Result<Room, StoreError> {
        let json = self.encode(&room)?;
        let mut conn = self.writer();
        // IMMEDIATE so that the name check and the update see the same state even when
        // another process writes to the database.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.db_error(e))?;
        let taken = tx
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM rooms WHERE name = ?1 AND id <> ?2)")
            .and_then(|mut s| s.query_row(params![room.name, room.id], |r| r.get::<_, bool>(0)))
            .map_err(|e| self.db_error(e))?;
        if taken {
            return Err(StoreError::Conflict(format!("a room named `{}` exists", room.name)));
        }
        let changed = tx
            .prepare_cached("UPDATE rooms SET name = ?2, room = ?3 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![room.id, room.name, json]))
            .map_err(|e| self.db_error(e))?;
        if changed == 0 {
            return Err(StoreError::NotFound(room.id));
        }
        tx.commit().map_err(|e| self.db_error(e))?;
        Ok(room)
    }

    /// Removes a room and returns it.
    pub fn delete(&self, id: &str) -> Result<Room, StoreError> {
        let mut conn = self.writer();
        // A transaction rather than DELETE ... RETURNING in autocommit: that commits when
        // the statement is reset, where a failed commit would go unreported.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.db_error(e))?;
        let json = tx
            .prepare_cached("SELECT room FROM rooms WHERE id = ?1")
            .and_then(|mut s| s.query_row(params![id], |r| r.get::<_, String>(0)).optional())
            .map_err(|e| self.db_error(e))?;
        let Some(json) = json else {
            return Err(StoreError::NotFound(id.into()));
        };
        // Not validated: a room that no longer validates must still be deletable.
        let removed: Room = serde_json::from_str(&json).map_err(|e| self.corrupt(format!("room {id}: {e}")))?;
        tx.prepare_cached("DELETE FROM rooms WHERE id = ?1").and_then(|mut s| s.execute(params![id])).map_err(|e| self.db_error(e))?;
        tx.commit().map_err(|e| self.db_error(e))?;
        Ok(removed)
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        // Poisoning only means a writer panicked; its transaction was rolled back when the
        // Transaction guard dropped, so the connection is usable.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on an idle read connection, opening one if none is idle, so that readers
    /// neither queue behind the writer nor behind each other.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match idle {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        let result = f(&conn);
        let mut idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        drop(idle);
        result.map_err(|e| self.db_error(e))
    }

    fn encode(&self, room: &Room) -> Result<String, StoreError> {
        serde_json::to_string(room).map_err(|e| self.corrupt(format!("room {}: {e}", room.id)))
    }

    /// Parses and validates a stored room, so that a row edited by hand into something
    /// invalid is reported instead of served.
    fn decode(&self, json: &str) -> Result<Room, StoreError> {
        let room: Room = serde_json::from_str(json).map_err(|e| self.corrupt(format!("room row: {e}")))?;
        room.validate().map_err(|e| self.corrupt(format!("room {}: {e}", room.id)))?;
        Ok(room)
    }

    /// Names which key a create collided on, with the same messages as the JSON store had.
    fn conflict(&self, conn: &Connection, room: &Room, original: rusqlite::Error) -> StoreError {
        let exists = |sql: &str, key: &str| conn.prepare_cached(sql).and_then(|mut s| s.query_row(params![key], |r| r.get::<_, bool>(0)));
        match exists("SELECT EXISTS(SELECT 1 FROM rooms WHERE id = ?1)", &room.id) {
            Ok(true) => return StoreError::Conflict(format!("a room with id `{}` exists", room.id)),
            Ok(false) => {}
            Err(e) => return self.db_error(e),
        }
        match exists("SELECT EXISTS(SELECT 1 FROM rooms WHERE name = ?1)", &room.name) {
            Ok(true) => StoreError::Conflict(format!("a room named `{}` exists", room.name)),
            Ok(false) => self.db_error(original),
            Err(e) => self.db_error(e),
        }
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), reason }
    }

    fn db_error(&self, source: rusqlite::Error) -> StoreError {
        db_error(&self.path, source)
    }

    /// Imports `rooms.json` from beside the database into an empty database, in one
    /// transaction, then renames it so it is not imported again.
    fn import_legacy_json(&self) -> Result<(), StoreError> {
        let legacy = self.path.with_file_name(LEGACY_FILE);
        let bytes = match std::fs::read(&legacy) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Io { path: legacy, source }),
        };
        let migrated = legacy.with_file_name(MIGRATED_FILE);
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.db_error(e))?;
        let imported_before = tx
            .query_row("SELECT value FROM meta WHERE key = 'json_import'", [], |r| r.get::<_, String>(0))
            .optional()
            .map_err(|e| self.db_error(e))?;
        if imported_before.is_some() {
            // The import committed but the rename did not happen (a crash in between):
            // finish it rather than import the same rooms again.
            drop(tx);
            rename(&legacy, &migrated)?;
            tracing::info!(file = ?legacy, "rooms.json was already imported; renamed it");
            return Ok(());
        }
        let existing: i64 = tx.query_row("SELECT COUNT(*) FROM rooms", [], |r| r.get(0)).map_err(|e| self.db_error(e))?;
        if existing > 0 {
            tracing::warn!(
                file = ?legacy,
                database = ?self.path,
                "rooms.json left untouched and not imported: the database already has rooms"
            );
            return Ok(());
        }
        let corrupt = |reason: String| StoreError::Corrupt { path: legacy.clone(), reason };
        let rooms: Vec<Room> = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        for room in &rooms {
            room.validate().map_err(|e| corrupt(format!("room {}: {e}", room.id)))?;
            let json = self.encode(room)?;
            let inserted = tx.prepare_cached(INSERT_ROOM).and_then(|mut s| s.execute(params![room.id, room.name, json]));
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(match self.conflict(&tx, room, e) {
                        StoreError::Conflict(m) => corrupt(format!("room {}: {m}", room.id)),
                        other => other,
                    });
                }
                Err(e) => return Err(self.db_error(e)),
            }
        }
        tx.execute("INSERT INTO meta (key, value) VALUES ('json_import', ?1)", params![rooms.len().to_string()]).map_err(|e| self.db_error(e))?;
        tx.commit().map_err(|e| self.db_error(e))?;
        rename(&legacy, &migrated)?;
        tracing::info!(
            rooms = rooms.len(),
            from = ?legacy,
            to = ?self.path,
            renamed_to = ?migrated,
            "migrated rooms from rooms.json into the database"
        );
        Ok(())
    }
}

fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let db = |e| db_error(path, e);
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(db)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(db)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unusable {
            path: path.into(),
            reason: format!("SQLite could not switch it to WAL journaling (journal mode is `{mode}`)"),
        });
    }
    // FULL: in WAL mode NORMAL already survives kill -9 (a commit is in the OS's cache
    // before the call returns) but can lose the last commits on power loss or an OS crash,
    // since it syncs the WAL only at checkpoints. FULL syncs the WAL at every commit, as
    // the JSON store synced every write; creates are operator actions, rare enough for that.
    conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Unusable {
            path: path.into(),
            reason: format!("schema version {version} is newer than this Tessera's ({SCHEMA_VERSION}); upgrade Tessera"),
        });
    }
    if version < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA).map_err(db)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(db)?;
    }
    tx.commit().map_err(db)?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let db = |e| db_error(path, e);
    // No CREATE: the writer made the file, and a reader must never make an empty one.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(db)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    conn.pragma_update(None, "query_only", true).map_err(db)?;
    Ok(conn)
}

fn db_error(path: &Path, source: rusqlite::Error) -> StoreError {
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt { path: path.into(), reason: source.to_string() },
        _ => StoreError::Db { path: path.into(), source },
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi::{SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE};
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == SQLITE_CONSTRAINT_UNIQUE || f.extended_code == SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// SQLite counts in i64; anything larger means "no limit".
fn to_sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(|source| StoreError::Io { path: from.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str, name: &str) -> Room {
        Room::from_options(id.into(), name.into(), serde_json::json!({})).unwrap()
    }

    fn ids(rooms: &[Room]) -> Vec<&str> {
        rooms.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn crud_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rooms.db");
        let store = RoomStore::open(&path).unwrap();
        assert_eq!(store.path(), path);
        store.create(room("a", "A")).unwrap();
        store.create(room("b", "B")).unwrap();
        assert!(matches!(store.create(room("c", "A")), Err(StoreError::Conflict(_))));
        let mut b = store.get("b").unwrap();
        b.participant_limit = 4;
        store.update(b).unwrap();
        assert_eq!(store.get("b").unwrap().participant_limit, 4);
        assert_eq!(store.delete("a").unwrap().name, "A");
        assert!(store.get("a").is_none());
        assert!(matches!(store.delete("a"), Err(StoreError::NotFound(_))));
        drop(store);
        let reopened = RoomStore::open(&path).unwrap();
        let rooms = reopened.list();
        assert_eq!(ids(&rooms), ["b"]);
        assert_eq!(rooms[0].participant_limit, 4);
        assert_eq!(reopened.count().unwrap(), 1);
    }

    #[test]
    fn conflicts_keep_their_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = RoomStore::open(dir.path().join("rooms.db")).unwrap();
        store.create(room("a", "A")).unwrap();
        store.create(room("b", "B")).unwrap();
        let msg = |r: Result<Room, StoreError>| match r {
            Err(StoreError::Conflict(m)) => m,
            other => panic!("expected a conflict, got {other:?}"),
        };
        assert_eq!(msg(store.create(room("a", "Z"))), "a room with id `a` exists");
        // Both taken: the id is reported, as the JSON store did.
        assert_eq!(msg(store.create(room("a", "B"))), "a room with id `a` exists");
        assert_eq!(msg(store.create(room("c", "A"))), "a room named `A` exists");
        assert_eq!(msg(store.update(room("b", "A"))), "a room named `A` exists");
        // Keeping its own name is not a conflict.
        store.update(room("b", "B")).unwrap();
        assert!(matches!(store.update(room("zz", "Q")), Err(StoreError::NotFound(id)) if id == "zz"));
        // A failed write changes nothing.
        assert_eq!(ids(&store.list()), ["a", "b"]);
        assert_eq!(store.get("b").unwrap().name, "B");
    }

    #[test]
    fn list_keeps_creation_order_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rooms.db");
        let store = RoomStore::open(&path).unwrap();
        for id in ["r1", "r2", "r3", "r4"] {
            store.create(room(id, &format!("name {id}"))).unwrap();
        }
        store.delete("r4").unwrap();
        store.delete("r2").unwrap();
        store.create(room("r5", "name r5")).unwrap();
        // Renaming does not move a room in the list.
        store.update(room("r1", "renamed")).unwrap();
        assert_eq!(ids(&store.list()), ["r1", "r3", "r5"]);
        assert_eq!(ids(&store.list_page(1, 1).unwrap()), ["r3"]);
        assert_eq!(ids(&store.list_page(1, 10).unwrap()), ["r3", "r5"]);
        assert!(store.list_page(3, 10).unwrap().is_empty());
        assert!(store.list_page(usize::MAX, usize::MAX).unwrap().is_empty());
        assert_eq!(store.count().unwrap(), 3);
        drop(store);
        assert_eq!(ids(&RoomStore::open(&path).unwrap().list()), ["r1", "r3", "r5"]);
    }

    #[test]
    fn uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = RoomStore::open(dir.path().join("rooms.db")).unwrap();
        let conn = store.writer();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous = FULL");
    }

    #[test]
    fn reads_do_not_wait_for_a_write_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(RoomStore::open(dir.path().join("rooms.db")).unwrap());
        store.create(room("a", "A")).unwrap();
        // Hold the writer in the middle of a transaction, as a slow create would.
        let mut writer = store.writer();
        let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        tx.execute(INSERT_ROOM, params!["b", "B", store.encode(&room("b", "B")).unwrap()]).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = store.clone();
        std::thread::spawn(move || {
            let seen = (reader.get("a").is_some(), reader.get("b").is_some(), reader.count().unwrap());
            let _ = done_tx.send(seen);
        });
        // Not a speed check: a reader that waited for the writer would wait forever here,
        // and this bound only turns that hang into a failure.
        let seen = done_rx.recv_timeout(Duration::from_secs(60)).expect("a read waited for the writer");
        assert_eq!(seen, (true, false, 1), "readers see the last commit, not the write in progress");
        tx.commit().unwrap();
        drop(writer);
        assert!(store.get("b").is_some());
    }

    fn write_legacy(dir: &Path, rooms: &[Room]) -> PathBuf {
        // Exactly what the JSON store wrote.
        let path = dir.join("rooms.json");
        std::fs::write(&path, serde_json::to_vec_pretty(rooms).unwrap()).unwrap();
        path
    }

    #[test]
    fn migrates_legacy_rooms_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut rooms: Vec<Room> = (0..50).map(|i| room(&format!("{i:024x}"), &format!("room {i}"))).collect();
        rooms[7].participant_limit = 3;
        rooms.push(room("dev", "dev"));
        let legacy = write_legacy(dir.path(), &rooms);
        let db = dir.path().join("rooms.db");

        let store = RoomStore::open(&db).unwrap();
        assert_eq!(store.list(), rooms, "every room, in the file's order");
        assert!(!legacy.exists());
        assert!(dir.path().join("rooms.json.migrated").exists());
        store.create(room("new", "new")).unwrap();
        drop(store);

        let store = RoomStore::open(&db).unwrap();
        assert_eq!(store.count().unwrap(), 52, "migrated rooms persist, and are not imported twice");
        assert_eq!(store.get(&rooms[7].id).unwrap().participant_limit, 3);
    }

    #[test]
    fn migration_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rooms.db");
        let legacy = write_legacy(dir.path(), &[room("a", "A"), room("b", "B")]);
        RoomStore::open(&db).unwrap();

        // A crash between the import's commit and the rename leaves the file in place;
        // even with every room deleted since, it must not come back.
        let store = RoomStore::open(&db).unwrap();
        store.delete("a").unwrap();
        store.delete("b").unwrap();
        drop(store);
        std::fs::copy(dir.path().join("rooms.json.migrated"), &legacy).unwrap();
        let store = RoomStore::open(&db).unwrap();
        assert_eq!(store.count().unwrap(), 0);
        assert!(!legacy.exists());
        drop(store);

        // A rooms.json beside a database that has rooms of its own is left alone.
        let store = RoomStore::open(dir.path().join("other.db")).unwrap();
        store.create(room("x", "X")).unwrap();
        drop(store);
        write_legacy(dir.path(), &[room("c", "C")]);
        let store = RoomStore::open(dir.path().join("other.db")).unwrap();
        assert_eq!(ids(&store.list()), ["x"]);
        assert!(legacy.exists());
    }

    #[test]
    fn corrupt_legacy_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rooms.db");
        let legacy = dir.path().join("rooms.json");

        std::fs::write(&legacy, "[{\"name\": 3}]").unwrap();
        let err = RoomStore::open(&db).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { path, .. } if *path == legacy), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("rooms.json") && msg.contains("not valid"), "{msg}");

        let mut bad = room("a", "A");
        bad.participant_limit = -5;
        write_legacy(dir.path(), &[room("ok", "ok"), bad]);
        let msg = RoomStore::open(&db).unwrap_err().to_string();
        assert!(msg.contains("rooms.json") && msg.contains("room a") && msg.contains("participantLimit"), "{msg}");

        write_legacy(dir.path(), &[room("a", "A"), room("b", "A")]);
        let msg = RoomStore::open(&db).unwrap_err().to_string();
        assert!(msg.contains("rooms.json") && msg.contains("a room named `A` exists"), "{msg}");

        // Nothing was half-imported and the file was kept for the operator to fix.
        assert!(legacy.exists());
        std::fs::remove_file(&legacy).unwrap();
        assert_eq!(RoomStore::open(&db).unwrap().count().unwrap(), 0);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rooms.db");
        std::fs::write(&db, vec![b'x'; 4096]).unwrap();
        let err = RoomStore::open(&db).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { path, .. } if *path == db), "{err:?}");
        assert!(err.to_string().contains("rooms.db"), "{err}");
    }

    #[test]
    fn a_missing_folder_is_reported_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("no-such-folder").join("rooms.db");
        let err = RoomStore::open(&db).unwrap_err();
        assert!(matches!(err, StoreError::Db { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-folder/rooms.db"), "{err}");
    }
}
