//! The room store: room configurations kept in memory and persisted to one JSON file
//! (`rooms.json` in the data folder).
//!
//! Why a JSON file: rooms are few (tens to thousands), change rarely, and operators like
//! to read and back them up with ordinary tools; an embedded database would add a
//! dependency and a format for no gain. Writes go to a temporary file that is synced and
//! renamed over the old one, so a crash mid-write leaves either the old or the new file,
//! never a torn one. Live state (participants, streams) is not stored here.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::room::Room;

/// Errors of the room store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No room with this id.
    #[error("Room not found: {0}")]
    NotFound(String),
    /// Another room already has this name or id.
    #[error("{0}")]
    Conflict(String),
    /// The file could not be read or written.
    #[error("room store {path}: {source}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but is not a valid room list.
    #[error("room store {path} is not valid: {reason}")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What failed to parse or validate.
        reason: String,
    },
}

/// Rooms in memory, written through to a JSON file.
#[derive(Debug)]
pub struct RoomStore {
    path: PathBuf,
    rooms: RwLock<Vec<Room>>,
}

impl RoomStore {
    /// Opens the store file at `path`, creating an empty store if it does not exist yet.
    pub fn open(path: impl Into<PathBuf>) -> Result<RoomStore, StoreError> {
        let path = path.into();
        let rooms = match std::fs::read(&path) {
            Ok(bytes) => {
                let rooms: Vec<Room> = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt { path: path.clone(), reason: e.to_string() })?;
                for room in &rooms {
                    room.validate().map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: format!("room {}: {e}", room.id),
                    })?;
                }
                rooms
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Ok(RoomStore { path, rooms: RwLock::new(rooms) })
    }

    /// The file this store persists to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Room>> {
        // Poisoning only means a writer panicked; the Vec itself is always consistent
        // because every mutation is a single push/remove/assign.
        self.rooms.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Room>> {
        self.rooms.write().unwrap_or_else(|p| p.into_inner())
    }

    /// All rooms, in creation order.
    pub fn list(&self) -> Vec<Room> {
        self.read().clone()
    }

    /// The room with this id.
    pub fn get(&self, id: &str) -> Option<Room> {
        self.read().iter().find(|r| r.id == id).cloned()
    }

    /// Adds a validated room; its id and name must be new.
    pub fn create(&self, room: Room) -> Result<Room, StoreError> {
        let mut rooms = self.write();
        if rooms.iter().any(|r| r.id == room.id) {
            return Err(StoreError::Conflict(format!("a room with id `{}` exists", room.id)));
        }
        if rooms.iter().any(|r| r.name == room.name) {
            return Err(StoreError::Conflict(format!("a room named `{}` exists", room.name)));
        }
        rooms.push(room.clone());
        if let Err(e) = self.persist(&rooms) {
            rooms.pop();
            return Err(e);
        }
        Ok(room)
    }

    /// Replaces a room's configuration (same id); the name must stay unique.
    pub fn update(&self, room: Room) -> Result<Room, StoreError> {
        let mut rooms = self.write();
        if rooms.iter().any(|r| r.name == room.name && r.id != room.id) {
            return Err(StoreError::Conflict(format!("a room named `{}` exists", room.name)));
        }
        let Some(idx) = rooms.iter().position(|r| r.id == room.id) else {
            return Err(StoreError::NotFound(room.id));
        };
        let old = std::mem::replace(&mut rooms[idx], room.clone());
        if let Err(e) = self.persist(&rooms) {
            rooms[idx] = old;
            return Err(e);
        }
        Ok(room)
    }

    /// Removes a room and returns it.
    pub fn delete(&self, id: &str) -> Result<Room, StoreError> {
        let mut rooms = self.write();
        let Some(idx) = rooms.iter().position(|r| r.id == id) else {
            return Err(StoreError::NotFound(id.into()));
        };
        let removed = rooms.remove(idx);
        if let Err(e) = self.persist(&rooms) {
            rooms.insert(idx, removed);
            return Err(e);
        }
        Ok(removed)
    }

    fn persist(&self, rooms: &[Room]) -> Result<(), StoreError> {
        use std::io::Write;
        let io = |source| StoreError::Io { path: self.path.clone(), source };
        let json = serde_json::to_vec_pretty(rooms)
            .map_err(|e| StoreError::Corrupt { path: self.path.clone(), reason: e.to_string() })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str, name: &str) -> Room {
        Room::from_options(id.into(), name.into(), serde_json::json!({})).unwrap()
    }

    #[test]
    fn crud_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rooms.json");
        let store = RoomStore::open(&path).unwrap();
        store.create(room("a", "A")).unwrap();
        store.create(room("b", "B")).unwrap();
        assert!(matches!(store.create(room("c", "A")), Err(StoreError::Conflict(_))));
        let mut b = store.get("b").unwrap();
        b.participant_limit = 4;
        store.update(b).unwrap();
        store.delete("a").unwrap();
        assert!(matches!(store.delete("a"), Err(StoreError::NotFound(_))));
        let reopened = RoomStore::open(&path).unwrap();
        let rooms = reopened.list();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms[0].participant_limit, 4);
    }

    #[test]
    fn corrupt_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rooms.json");
        std::fs::write(&path, "[{\"name\": 3}]").unwrap();
        let err = RoomStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("rooms.json") && err.contains("not valid"), "{err}");
    }
}
